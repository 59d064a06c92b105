#!/usr/bin/env bash
# After stage 1: stage 2 (JCM), β on val, export the shipped model, then quality and speed measurements.
# RUN names the training folder (phase C: runs/tiny3); stage 2 there trains a residual correction on the same
# mixture and reference noise as stage 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
M=.venv/bin/mediround
RUN=${RUN:-runs/tiny3}
$M train --out "$RUN" --stage 2 --init "$RUN/stage1/checkpoint" --steps "${STAGE2_STEPS:-250}" --batch-size 8 \
  --save-every 50 --residual-correction --reference-noise 0.3 --data train+train-long
.venv/bin/python -m MediRoundCore.evaluate.select_beta --checkpoint "$RUN/stage2/checkpoint" --limit "${BETA_LIMIT:-80}" | tee runs/beta.log
BETA=$(tail -1 runs/beta.log | awk '{print $3}')
.venv/bin/python -m MediRoundCore.train.export "$RUN/stage2/checkpoint" --beta "$BETA"
# Speed (quiet machine), then quality on the hard and regular splits, the panel screenshot and README overlays.
.venv/bin/mediround bench
.venv/bin/mediround eval --split hard --limit "${EVAL_LIMIT:-500}" --threads 2 --out benchmarks
.venv/bin/mediround eval --split regular --limit "${REGULAR_LIMIT:-150}" --threads 2 --configs ind+jcm,ind-nojcm,resolver+jcm --out benchmarks/regular
QT_QPA_PLATFORM=offscreen .venv/bin/python MediRoundSlicer/make_screenshot.py
.venv/bin/mediround demo --out demo_output
