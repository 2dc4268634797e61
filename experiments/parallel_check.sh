#!/usr/bin/env bash
# Repeats sharing one GPU: the wall time of N repeats run at once (run_table.py --parallel=N,
# each repeat a process with 1/N of the memory) against one repeat alone, and whether the
# repeat they share gives the same numbers. The goal on a GPU: N=3 in at most 1.5x one.
# Data: a folder of random CIFAR-100-shaped PNGs written here (nothing to carry), prepared
# once. Both runs use XLA_FLAGS=--xla_gpu_deterministic_ops=true, so that a difference in the
# numbers is the processes', not the GPU's reduction order.
# Usage: bash experiments/parallel_check.sh [OUT] [extra --config flags...]
#   env N (3), PER_CLASS (train images per class, 100), CONFIG (configs/cifar100.py)
# CPU try-out: bash experiments/parallel_check.sh /tmp/pc --config.model=resnet8 \
#   --config.epochs=1 --config.synthesis.iterations=4   (with PER_CLASS=10)
# Writes parallel_check.log into OUT, and prints the ratio; rerunning reuses finished runs.
set -u
out="${1:-${OUT:-/tmp/parallel_check}}"; shift || true
n="${N:-3}"
per_class="${PER_CLASS:-100}"
config="${CONFIG:-configs/cifar100.py}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  python3 - "$out/random_cifar" "$per_class" <<'EOF'
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
  common=(--config="$config" --config.dataset="folder:$out/random_cifar"
          --config.data_dir="$out/tfds" --config.num_tasks=2 --config.num_devices=1 "$@")
  python3 -m abd_jax.prepare_data --dataset="folder:$out/random_cifar" --data_dir="$out/tfds"
  t0=$(date +%s.%N)
  python3 -m abd_jax.main "${common[@]}" --workdir="$out/one" 2>"$out/one.log"
  echo "one repeat alone: exit $?"
  t1=$(date +%s.%N)
  python3 experiments/run_table.py "${common[@]}" --rows=abd --workdir="$out/table" \
    --config.repeats="$n" --parallel="$n" 2>"$out/table.log" >/dev/null
  echo "$n repeats, --parallel=$n: exit $?"
  t2=$(date +%s.%N)
  python3 - "$t0" "$t1" "$t2" "$n" "$out" <<'EOF'
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
  date -u
} 2>&1 | tee -a "$out/parallel_check.log"
