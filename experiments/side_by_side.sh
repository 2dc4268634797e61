#!/usr/bin/env bash
# The PyTorch release's steps beside ours on one device in the same hour: the CE, ABD and
# generator steps at ResNet-32 batch 128, float32. Runs ours (experiments/benchmark.py), the
# release's own (experiments/release_bench.py, the release unchanged) and ours again, then
# prints release ms / our ms per step. Both JSON files and the log stay in OUT.
# Usage on a GPU machine with torch: bash experiments/side_by_side.sh OUT RELEASE_DIR [STEPS]
#   RELEASE_DIR: a checkout of GT-RIPL/AlwaysBeDreaming-DFCIL.
#   env BENCH_FLAGS / RELEASE_FLAGS: extra flags for each (a CPU try-out: BENCH_FLAGS="--model=
#   resnet8 --batch_size=16" RELEASE_FLAGS="--device=cpu --batch_size=16", STEPS 2).
set -u
out="$1"; release="$2"; steps="${3:-200}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
  # shellcheck disable=SC2086
  for part in ours_1 release ours_2; do
    echo "=== $part"
    if [ "$part" = release ]; then
      python3 experiments/release_bench.py --release_dir="$release" --steps="$steps" \
        --repeats=5 --json_out="$out/$part.json" ${RELEASE_FLAGS:-}
    else
      python3 experiments/benchmark.py --cases=ce,abd,generator --steps="$steps" --repeats=5 \
        --json_out="$out/$part.json" ${BENCH_FLAGS:-}
    fi || echo "($part ended with status $?)"
  done
  python3 - "$out" <<'EOF'
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
  date -u
} 2>&1 | tee -a "$out/side_by_side.log"
