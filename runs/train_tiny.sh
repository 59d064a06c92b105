#!/usr/bin/env bash
# Background training of MediRound-Tiny stage 1 (resumable): what produced the shipped model.
# Phase A (runs/tiny, 450 steps, paper loss weights) collapsed to empty masks: from scratch the segmenter
# needs a stronger overlap term. Phase B continues from phase A's weights with Dice weight 2.0.
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec nice -n -10 .venv/bin/mediround train --out runs/tiny2 --stage 1 --init runs/tiny/stage1/checkpoint \
  --steps "${STEPS:-1700}" --batch-size 8 --save-every 50 --dice-weight 2.0
