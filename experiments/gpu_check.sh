#!/usr/bin/env bash
# One device session for the step speed (issue #10): versions, issue #10's benchmark command as
# filed and as fixed, the step ladder with a profile, then the step table (float32 with 3
# vmapped repeats, the "mask" skip mode, bfloat16, the im2col convolution).
# Usage on a GPU machine without internet: bash experiments/gpu_check.sh [OUT_DIR]
# (installs any wheels carried in .whl/ first, e.g. ml-collections). Takes ~8 minutes on one
# H200; each part is cut off after PART_TIMEOUT seconds (default 200) so later parts still run.
# Writes gpu_check.log, stderr.txt and results.tar (one JSON per part) into OUT_DIR.
set -u
out="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
limit="${PART_TIMEOUT:-200}"
json_dir=$(mktemp -d)
# bench NAME ARGS...: one benchmark process; its log goes to stdout, its stderr to
# $out/stderr.txt, its JSON into $out/results.tar at the end. $BENCH_EXTRA is appended to
# every call (e.g. tiny settings to try the script on a CPU).
bench() {
  local name="$1"; shift
  echo; echo "=== $name: benchmark.py $* ${BENCH_EXTRA:-}"
  echo "=== $name" >>"$out/stderr.txt"
  # shellcheck disable=SC2086
  timeout "$limit" python3 experiments/benchmark.py --json_out="$json_dir/$name.json" "$@" \
    ${BENCH_EXTRA:-} 2>>"$out/stderr.txt" || echo "(part $name ended with status $?)"
}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  # 1. Issue #10's command as filed: the first call's uncommitted state differs from the
  #    committed state it returns, so the second call compiles again inside the first of only
  #    two measurements (look for RECOMPILED). Then the same command as the benchmark now runs.
  bench issue_as_filed --cases=ce --steps=100 --repeats=2 --put_state=False
  bench issue_fixed --cases=ce --steps=100 --repeats=2
  # 2. The steps as training runs them, and 3 repeats vmapped into one program.
  bench table_fp32 --cases=ce,lwf,abd,deepinversion,generator --steps=200 --repeats=5 \
    --vmap_repeats=3
  # 3. Where a learner step's time goes, stage by stage, and the top kernels.
  bench ladder --ladder=ce,abd --cases= --steps=100 --repeats=3 --profile_dir=/tmp/abd_prof \
    --top=15
  # 4. bfloat16; fused chunks without lax.cond; the im2col convolution (the CPU path) on GPU.
  bench table_bf16 --cases=ce,abd,generator --dtypes=bfloat16 --steps=200 --repeats=5
  bench table_mask --cases=ce,abd,generator --skip_modes=mask --steps=200 --repeats=5
  bench table_im2col --cases=ce,abd --conv_impls=im2col --steps=200 --repeats=3
  date -u
} 2>&1 | tee "$out/gpu_check.log"
tar -cf "$out/results.tar" -C "$json_dir" .
