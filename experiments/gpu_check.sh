#!/usr/bin/env bash
# One device session: versions, then the step benchmark in float32 and bfloat16.
# Usage on a GPU machine without internet: bash experiments/gpu_check.sh [OUT_DIR]
# (installs any wheels carried in .whl/ first, e.g. ml-collections).
set -u
out="${1:-${OUT:-/tmp}}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o, chex; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 experiments/benchmark.py --steps=200 --repeats=3 2>"$out/bench_fp32.err" | tee "$out/bench_fp32.txt"
python3 experiments/benchmark.py --steps=200 --repeats=3 --dtype=bfloat16 --cases=ce,abd,generator \
  2>"$out/bench_bf16.err" | tee "$out/bench_bf16.txt"
tail -n 5 "$out"/bench_*.err
