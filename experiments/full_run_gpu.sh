#!/usr/bin/env bash
# Issue #10 item 4: the full 10-task CIFAR-100-shaped ABD schedule (250 epochs x 39 steps per
# task, 10,000 generator iterations after tasks 1-9, evaluation after every task) on random
# data, timed as consecutive segments when one command may not run that long. Each call runs
# experiments/timing_run.py for at most SECONDS, then SIGTERM makes it save a checkpoint and
# exit; the next call with the same flags resumes it. Every segment's wall time (process start
# to exit, so each resume's start-up and compilation are counted) is appended to
# runs/full_run_segments.txt and the sum is printed: that sum is the measured run time.
# Usage on a GPU machine: bash experiments/full_run_gpu.sh SECONDS [timing_run.py flags...]
# Env: WORKDIR (default runs/full_run), OUT (log and results copied there).
# Wheels in .whl/ are installed first: a GPU image without them needs ml-collections and
# tensorboardX (timing_run imports neither grain nor tensorflow-datasets).
set -u
limit="$1"; shift
out="${OUT:-/tmp/full_run}"
wd="${WORKDIR:-runs/full_run}"
segments="$(dirname "$wd")/full_run_segments.txt"
mkdir -p "$out" "$wd"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# Compiled programs are kept on disk so that a resumed segment does not compile them again.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(dirname "$wd")/jax_cache}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  start=$(date +%s.%N)
  timeout -s TERM -k 60 "$limit" python3 experiments/timing_run.py \
    --config=configs/cifar100.py --workdir="$wd" "$@"
  status=$?
  end=$(date +%s.%N)
  python3 - "$start" "$end" "$status" "$segments" <<'EOF'
import sys
start, end, status, path = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(path, "a") as f:
    f.write(f"{end - start:.1f} {status}\n")
rows = [line.split() for line in open(path)]
done = "finished" if status == "0" else f"stopped (exit {status}), resume with the same command"
print(f"segment {len(rows)}: {end - start:.1f} s, {done}")
print(f"segments so far: {[float(r[0]) for r in rows]}; sum {sum(float(r[0]) for r in rows):.1f} s")
EOF
  date -u
} 2>&1 | tee -a "$out/full_run.log"
cp "$segments" "$out/" 2>/dev/null
for f in results.json summary.md; do cp "$wd/$f" "$out/" 2>/dev/null; done
exit 0
