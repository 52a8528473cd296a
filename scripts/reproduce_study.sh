#!/usr/bin/env bash
# Reproduce the study end to end: every DINOv2 variant whose weights are available, all probe heads
# and poolings, frozen/unfrozen fine-tuning of S and B (with and without registers), the baselines
# and the report.
#   scripts/reproduce_study.sh            # everything (hours on CPU; use a GPU for finetune)
#   scripts/reproduce_study.sh --quick    # small subset in minutes: ViT-S-reg probes, baselines, report
# Variables: OUT (default runs/study), REPORT (default report/study), EXTRA (extra args for every tprobe call).
set -uo pipefail
OUT=${OUT:-runs/study}
REPORT=${REPORT:-report/study}
EXTRA=${EXTRA:-}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

models=(dinov2-small-reg dinov2-small dinov2-base-reg dinov2-base dinov2-large-reg dinov2-large dinov2-giant-reg dinov2-giant)
finetune_models=(dinov2-small-reg dinov2-small dinov2-base-reg dinov2-base)
if [ $QUICK = 1 ]; then models=(dinov2-small-reg); finetune_models=(); fi

skipped=()
tprobe preprocess $EXTRA || exit 1
for m in "${models[@]}"; do
  if ! tprobe extract --model "$m" $EXTRA; then
    skipped+=("$m (weights not available: see the error above)")
    continue
  fi
  if [ $QUICK = 1 ]; then
    tprobe probe --model "$m" --head logreg --pool all --out "$OUT" $EXTRA
  else
    tprobe probe --model "$m" --head all --pool all --out "$OUT" $EXTRA
  fi
done
for m in "${finetune_models[@]}"; do
  for mode in --freeze ""; do
    tprobe finetune --model "$m" $mode --out "$OUT" $EXTRA || skipped+=("finetune $m $mode")
  done
done
if [ $QUICK = 1 ]; then
  tprobe baseline --name frequency --out "$OUT"
  tprobe baseline --name pixel-logreg --out "$OUT"
else
  tprobe baseline --name all --out "$OUT"
fi
tprobe report "$OUT" --out "$REPORT"
if [ ${#skipped[@]} -gt 0 ]; then
  echo "skipped:"
  printf '  %s\n' "${skipped[@]}"
fi
