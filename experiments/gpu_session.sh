#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in parts that a later call goes on with:
#   parallel  3 repeats sharing the GPU (run_table.py --parallel=3, each a process with a third
#             of the memory) against one repeat alone, 2-task ABD on random CIFAR-100-shaped
#             images, and whether the shared repeat 0 gives the numbers of the run alone
#             (goal: 3 in at most 1.5x the time of one);
#   release   the PyTorch release's steps beside ours, float32: benchmark.py, the release
#             unchanged (release_bench.py, run by $RELEASE_PYTHON with the release on
#             PYTHONPATH), benchmark.py again; when $RELEASE holds the release (a checkout of
#             GT-RIPL/AlwaysBeDreaming-DFCIL, or an archive of one) and torch imports;
#   full_run  the full 10-task CIFAR-100 ABD schedule on random data (benchmark.py --mode=run,
#             $FULL_RUN_FLAGS) for what is left of SECONDS less 60; SIGTERM stops it with a
#             checkpoint, the next call resumes it, and the segments' wall times add up to
#             the run's (full_run_segments.txt);
#   steps     the step figures (benchmark.py): the recompilation pitfall, the step table
#             (float32 with 3 vmapped repeats, bfloat16 with either generator dtype, the mask
#             skip mode, the im2col convolution), the ladder with a profile; each benchmark
#             cut off after PART_TIMEOUT seconds. Not in the default PARTS.
# Usage on a GPU machine (carry .release): bash experiments/gpu_session.sh SECONDS [OUT]
# OUT receives session.log and results.tar (the folder $STATE/results: every part's log and
# JSON), rewritten after each part. Copy what it measured into experiments/results/, named
# with the device and date.
# A part whose results are in $STATE/results is skipped, so calling again goes on: on the same
# machine as it is; on a fresh one after `tar -xf results.tar -C $STATE` here and carrying
# $STATE (the full run resumes only where its workdir, $STATE/full_run, is there too).
# The project runs from requirements.lock, installed into runs/gpu_venv (from the registry, or
# from the wheels carried in .whl/ where there is none), apart from python3's own packages
# (torch, for the release); where it cannot be installed, python3's packages are used as they
# are (with any carried wheels), and the log gives their versions.
# env: PARTS (parallel,release,full_run), in this order; STATE (runs/gpu_session);
#   PART_TIMEOUT (200); FULL_RUN_FLAGS (--config.dtype=bfloat16 --config.compile_ahead=True);
#   PYTHON: use this interpreter as it is, installing nothing; RELEASE (.release): the release,
#   a checkout, an archive, or a folder holding one; RELEASE_PYTHON (python3);
#   TINY=1: tiny settings (ResNet-8, 8x8 images, digits-shaped full run), to try this on a CPU.
set -u
[ $# -ge 1 ] || { echo "usage: bash experiments/gpu_session.sh SECONDS [OUT]"; exit 2; }
budget="$1"; out="${2:-${OUT:-/tmp/gpu_session}}"
state="${STATE:-runs/gpu_session}"; res="$state/results"
parts="${PARTS:-parallel,release,full_run}"
full_run_flags="${FULL_RUN_FLAGS---config.dtype=bfloat16 --config.compile_ahead=True}"
release_src="${RELEASE:-.release}"
tiny="${TINY:-0}"
for part in ${parts//,/ }; do
  case "$part" in parallel|release|full_run|steps) ;;
    *) echo "PARTS: unknown part $part (parallel, release, full_run, steps)"; exit 2 ;; esac
done
mkdir -p "$out" "$res"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
timeout_s() { local l; l=$(left); [ "$l" -gt 1 ] && echo "$l" || echo 1; }  # for timeout
export PYTHONUNBUFFERED=1

setup_python() {  # sets py
  if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; return; fi
  local venv=runs/gpu_venv
  py="$venv/bin/python"
  "$py" -c "import abd_jax, ml_collections" 2>/dev/null && return
  [ -d .whl ] && export PIP_FIND_LINKS="$PWD/.whl"
  if python3 -m venv "$venv" && "$venv/bin/pip" install -q --retries 1 -r requirements.lock \
      "jax[cuda12]==0.10.2" && "$venv/bin/pip" install -q --no-deps -e .; then return; fi
  echo "requirements.lock could not be installed here: going on with python3's own packages"
  py=python3
  export PYTHONPATH="$PWD"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
  fi
}

# bench NAME FLAGS...: one benchmark.py process writing $res/steps/NAME.json; skipped when
# that is there. $BENCH_TINY is appended to every call.
bench() {
  local name="$1"; shift
  [ -s "$res/steps/$name.json" ] && { echo "=== $name: measured in an earlier call"; return; }
  local limit; limit=$(left); [ "$limit" -gt "${PART_TIMEOUT:-200}" ] && limit="${PART_TIMEOUT:-200}"
  [ "$limit" -gt 30 ] || { echo "=== $name: not started, $(left) s left"; return 1; }
  echo; echo "=== $name: benchmark.py $* $BENCH_TINY"
  echo "=== $name" >>"$res/steps/stderr.txt"
  # shellcheck disable=SC2086
  timeout "$limit" "$py" experiments/benchmark.py --json_out="$res/steps/$name.json" "$@" \
    $BENCH_TINY 2>>"$res/steps/stderr.txt" || { echo "($name ended with status $?)"; return 1; }
}

part_steps() {
  mkdir -p "$res/steps"
  local ok=0
  # An uncommitted initial state makes the second call compile again inside the first
  # measurement (look for RECOMPILED); then the same command as the benchmark runs it.
  bench pitfall_uncommitted --cases=ce --steps=100 --repeats=2 --put_state=False || ok=1
  bench pitfall_placed --cases=ce --steps=100 --repeats=2 || ok=1
  bench table_fp32 --cases=ce,lwf,abd,deepinversion,generator --steps=200 --repeats=5 \
    --vmap_repeats=3 || ok=1
  bench ladder --ladder=ce,abd --cases= --steps=100 --repeats=3 \
    --profile_dir="$state/profile" --top=15 || ok=1
  bench table_bf16 --cases=ce,abd,generator --dtypes=bfloat16 --steps=200 --repeats=5 || ok=1
  bench table_bf16_generator_fp32 --cases=abd,generator --dtypes=bfloat16 \
    --generator_dtype=float32 --steps=200 --repeats=5 || ok=1
  bench table_mask --cases=ce,abd,generator --skip_modes=mask --steps=200 --repeats=5 || ok=1
  bench table_im2col --cases=ce,abd --conv_impls=im2col --steps=200 --repeats=3 || ok=1
  return $ok
}

release_dir() {  # prints the folder holding the release's learners/, unpacking an archive once
  local found archive
  found=$(find -L "$release_src" "$state/release" -maxdepth 3 -type d -name learners \
    2>/dev/null | head -n 1)
  if [ -z "$found" ]; then
    archive=$(find -L "$release_src" -maxdepth 1 -type f \( -name '*.tar*' -o -name '*.tgz' \
      -o -name '*.zip' \) 2>/dev/null | head -n 1)
    [ -n "$archive" ] || return 1
    mkdir -p "$state/release"
    case "$archive" in
      *.zip) python3 -m zipfile -e "$archive" "$state/release" ;;
      *) tar -xf "$archive" -C "$state/release" ;;
    esac || return 1
    found=$(find "$state/release" -maxdepth 3 -type d -name learners | head -n 1)
  fi
  [ -n "$found" ] && dirname "$found"
}

part_release() {
  local release steps=200 bench_flags="" release_flags="" run
  local release_py="${RELEASE_PYTHON:-python3}"
  release=$(release_dir) \
    || { echo "release: skipped, $release_src holds no release"; return 2; }
  "$release_py" -c "import torch" 2>/dev/null \
    || { echo "release: skipped, $release_py has no torch"; return 2; }
  [ "$tiny" = 1 ] && { steps=2; bench_flags="$BENCH_TINY --batch_size=16"
                       release_flags="--device=cpu --batch_size=16"; }
  mkdir -p "$res/release"
  "$release_py" -c "import torch; print('release: torch', torch.__version__)"
  for run in ours_1 release ours_2; do
    echo "=== $run"
    # shellcheck disable=SC2086
    if [ "$run" = release ]; then
      PYTHONPATH="$release" timeout "$(timeout_s)" "$release_py" experiments/release_bench.py \
        --steps="$steps" --repeats=5 --json_out="$res/release/$run.json" $release_flags
    else
      timeout "$(timeout_s)" "$py" experiments/benchmark.py --cases=ce,abd,generator \
        --steps="$steps" --repeats=5 --json_out="$res/release/$run.json" $bench_flags
    fi || { echo "($run ended with status $?)"; return 1; }
  done
  "$py" - "$res/release" <<'EOF'
import json, sys
out = sys.argv[1]
load = lambda name: json.load(open(f"{out}/{name}.json"))
ours = [{r["label"]: r["ms_median"] for r in load(n)["rows"] if r["part"] == "table"}
        for n in ("ours_1", "ours_2")]
release = load("release")
print(f"\nmedian ms per step; release: torch {release['torch']} on {release['device']}")
print(f"{'step':10s} {'ours (1st, 2nd run)':>22s} {'release':>9s} {'release / ours':>15s}")
for row in release["rows"]:
    case, theirs = row["case"], row["ms_median"]
    a, b = ours[0][case], ours[1][case]
    print(f"{case:10s} {a:10.2f} {b:10.2f} {theirs:9.2f} {theirs / ((a + b) / 2):14.1f}x")
EOF
}

part_parallel() {
  local dir="$state/parallel" n=3 per_class=100 t0 t1 t2
  local run_flags=(--config.epochs=20 --config.synthesis.iterations=2000)
  [ "$tiny" = 1 ] && { n=2; per_class=10
    run_flags=(--config.model=resnet8 --config.epochs=1 --config.synthesis.iterations=4); }
  # Deterministic GPU reductions, so that a difference in the numbers is the processes'.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
  "$py" - "$dir/random_cifar" "$per_class" <<'EOF'
import pathlib, sys
import numpy as np
from PIL import Image
root, per_class = pathlib.Path(sys.argv[1]), int(sys.argv[2])
if not (root / "done").exists():
    rng = np.random.RandomState(0)
    for split, count in (("train", per_class), ("test", max(per_class // 5, 1))):
        for c in range(100):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    (root / "done").write_text("")
print(f"random CIFAR-100-shaped folder: {root} ({per_class} train images per class)")
EOF
  local common=(--config=configs/cifar100.py --config.dataset="folder:$dir/random_cifar"
                --config.data_dir="$dir/tfds" --config.num_tasks=2 --config.num_devices=1
                "${run_flags[@]}")
  "$py" -m abd_jax.prepare_data --dataset="folder:$dir/random_cifar" --data_dir="$dir/tfds" \
    || return 1
  t0=$(date +%s.%N)
  timeout "$(timeout_s)" "$py" -m abd_jax.main "${common[@]}" --workdir="$dir/one" \
    2>>"$res/parallel_one.log" || { echo "one repeat alone: exit $?"; return 1; }
  t1=$(date +%s.%N)
  timeout "$(timeout_s)" "$py" experiments/run_table.py "${common[@]}" --rows=abd \
    --workdir="$dir/table" --config.repeats="$n" --parallel="$n" 2>>"$res/parallel_table.log" \
    >/dev/null || { echo "$n repeats, --parallel=$n: exit $?"; return 1; }
  t2=$(date +%s.%N)
  "$py" - "$t0" "$t1" "$t2" "$n" "$dir" <<'EOF'
import json, sys
t0, t1, t2, n, out = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
one = json.load(open(f"{out}/one/results.json"))["repeats"][0]
many = json.load(open(f"{out}/table/abd/results.json"))["repeats"]
print(f"wall: one repeat {t1 - t0:.1f} s; {n} repeats at once {t2 - t1:.1f} s = "
      f"{(t2 - t1) / (t1 - t0):.2f}x one (goal: 1.5x for 3; a rerun of finished runs is 0)")
print("repeat 0 of the parallel run gives the numbers of the run alone:",
      many[0]["R_global"] == one["R_global"])
print("A_N per repeat:", [round(r["final_accuracy"], 2) for r in many])
EOF
}

part_full_run() {
  local wd="$state/full_run" segments="$res/full_run_segments.txt" limit t0 t1 status
  local run_flags=(--config=configs/cifar100.py)
  [ "$tiny" = 1 ] && run_flags=(--config=configs/digits.py --config.num_tasks=2
    --config.epochs=1 --config.synthesis.iterations=4 --train_per_class=20 --test_per_class=5)
  if [ -s "$segments" ] && [ ! -d "$wd" ]; then
    echo "the full run's workdir is gone: starting it again (earlier segments moved aside)"
    mv "$segments" "$segments.$(date +%s)"
  fi
  limit=$(( $(left) - 60 ))
  [ "$limit" -ge 60 ] || { echo "full_run: no time left for a segment ($(left) s)"; return 1; }
  # Compiled programs stay on disk, so that a resumed segment does not compile them again.
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$state/jax_cache}"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  timeout -s TERM -k 45 "$limit" "$py" experiments/benchmark.py --mode=run --workdir="$wd" \
    "${run_flags[@]}" $full_run_flags
  status=$?
  t1=$(date +%s.%N)
  "$py" - "$t0" "$t1" "$status" "$segments" <<'EOF'
import sys
start, end, status, path = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(path, "a") as f:
    f.write(f"{end - start:.1f} {status}\n")
rows = [line.split() for line in open(path)]
done = "finished" if status == "0" else f"stopped (exit {status}), resumed by the next call"
print(f"segment {len(rows)}: {end - start:.1f} s, {done}")
print(f"segments so far: {[float(r[0]) for r in rows]}; sum {sum(float(r[0]) for r in rows):.1f} s")
EOF
  for f in results.json summary.md; do cp "$wd/$f" "$res/full_run_$f" 2>/dev/null; done
  return "$status"
}

save_out() { tar -cf "$out/results.tar" -C "$state" results; }

BENCH_TINY=""
[ "$tiny" = 1 ] && BENCH_TINY="--model=resnet8 --image_size=8 --batch_size=8 --steps=1 \
--num_classes=10 --repeats=1"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    2>/dev/null
  setup_python
  "$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  for part in ${parts//,/ }; do
    echo; echo "##### $part ($(left) s of $budget left)"
    if [ -e "$res/$part.done" ]; then
      echo "$part: done in an earlier call (its log: $res/$part.log)"; continue
    fi
    [ "$(left)" -ge 60 ] || { echo "$part: not started, $(left) s left"; continue; }
    set -o pipefail
    "part_$part" 2>&1 | tee -a "$res/$part.log"
    status=$?
    set +o pipefail
    [ "$status" = 0 ] && touch "$res/$part.done"
    save_out
  done
  date -u
} 2>&1 | tee "$out/session.log"
save_out
