#!/usr/bin/env bash
# After stage 1: stage 2 (JCM), β on val, export the shipped model, then quality and speed measurements.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
M=.venv/bin/mediround
$M train --out runs/tiny2 --stage 2 --init runs/tiny2/stage1/checkpoint --steps "${STAGE2_STEPS:-150}" --batch-size 8 --save-every 50
.venv/bin/python -m MediRoundCore.evaluate.select_beta --checkpoint runs/tiny2/stage2/checkpoint --limit 60 | tee runs/beta.log
BETA=$(tail -1 runs/beta.log | awk '{print $3}')
.venv/bin/python -m MediRoundCore.train.export runs/tiny2/stage2/checkpoint --beta "$BETA"
# Speed (quiet machine), then quality on the hard and regular splits, the panel screenshot and README overlays.
.venv/bin/mediround bench
.venv/bin/mediround eval --split hard --limit "${EVAL_LIMIT:-500}" --threads 2 --out benchmarks
.venv/bin/mediround eval --split regular --limit "${REGULAR_LIMIT:-150}" --threads 2 --configs ind+jcm,ind-nojcm,resolver+jcm --out benchmarks/regular
QT_QPA_PLATFORM=offscreen .venv/bin/python MediRoundSlicer/make_screenshot.py
.venv/bin/mediround demo --out demo_output
