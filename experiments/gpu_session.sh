#!/usr/bin/env bash
# Every device check of one GPU session, in order of what is least measured, each part
# skipped when its result is already in OUT (rerun with the same OUT to go on):
#   1. repeats sharing the GPU: experiments/parallel_check.sh (3 at once vs one alone);
#   2. the release beside ours: experiments/side_by_side.sh (when .release/ holds a checkout of
#      GT-RIPL/AlwaysBeDreaming-DFCIL and torch imports; carry .release/ to the machine);
#   3. the full 10-task schedule: experiments/full_run_gpu.sh for what is left of SECONDS
#      (bfloat16, compile_ahead), resumed by the next session from runs/full_run.
# Usage on the GPU machine: bash experiments/gpu_session.sh SECONDS [OUT]
# Copy OUT's logs into experiments/results/ afterwards, named with the device and date.
set -u
budget="$1"; out="${2:-${OUT:-/tmp/gpu_session}}"
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
if [ ! -s "$out/parallel_check/table/abd/results.json" ]; then
  bash experiments/parallel_check.sh "$out/parallel_check" --config.epochs=20 \
    --config.synthesis.iterations=2000
fi
if [ ! -s "$out/side_by_side/release.json" ] && [ -d .release ] \
    && python3 -c "import torch" 2>/dev/null; then
  bash experiments/side_by_side.sh "$out/side_by_side" .release 200
fi
remaining=$(left)
if [ "$remaining" -gt 120 ]; then
  OUT="$out/full_run" bash experiments/full_run_gpu.sh "$((remaining - 30))" \
    --config.dtype=bfloat16 --config.compile_ahead=True
else
  echo "no time left for a full-run segment ($remaining s of $budget)"
fi
