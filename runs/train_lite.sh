#!/usr/bin/env bash
# Background training of MediRound-Lite stage 1 (issue 23; resumable across sessions: rerun to continue).
# Steps 0-100: the defaults below with --dice-weight 0.5 and every dialogue from the train split's settings.
# From step 100: half of the dialogues with train-long's (the hard split's) settings. From step 150: Dice weight
# 2.0, as MediRound-Tiny needed against empty masks (phase A in train_tiny.sh).
# From step 2000 the training grammar words relations many more ways (session 36), and steps run under
# bfloat16 autocast where the CPU multiplies bf16 natively (--precision auto; float32 weights and Adam state).
# From step 2850 (session 37) the schedule ends at step 4800 instead of 8000: the learning rate decays linearly to 0
# there, so stage 1 ends annealed within this session and the JCM and the shipping measurements can follow
# (runs/finish_lite.sh); a later, longer run can re-warm from it.
# Steps 4800-5150 (session 38): training re-wordings add a true side clause to descriptions of unpaired
# structures ("the organ that removes old red blood cells on the same side as it": step 4800 answered the left
# hemisphere); the schedule's end moved to 5150, so these steps start at 2.1e-5 and decay to 0.
# The vision tower starts from the tiny model's (weights/mediround-tiny; ignored when resuming). One step of 4 dialogues is about
# 5.5 s on two idle cores once the pool's views are cached; a GPU run is the same command on the device machine.
# On a fresh clone (runs/lite gone) it continues from runs/lite-snapshot, the run's weights and step carried in
# the repository (`python -m MediRoundCore.train.snapshot save runs/lite/checkpoint runs/lite-snapshot`, then
# commit it). Each (re)start renders and encodes at most 600 views it has not encoded before (--new-views; ~2 s
# each on two cores, ~20 min), so a fresh clone trains at full speed within the hour; restarts cover the pool.
# Since session 40 runs/lite-snapshot holds step 5800 of the fine-tune that follows this run (runs/finetune_lite.sh;
# not shipped); the shipped model's stage 1, step 5150, is the snapshot of commit 659dd7c.
set -euo pipefail
cd "$(dirname "$0")/.."
start=(--vision-from MediRoundCore/weights/mediround-tiny)
if [ -f runs/lite-snapshot/snapshot.json ]; then start=(--from-snapshot runs/lite-snapshot); fi
exec nice -n 5 .venv/bin/python -m MediRoundCore.train.lite --out runs/lite --steps 5150 --pool-slices 1000 \
  --views 2 --save-every 50 --threads 2 --long-share 0.5 --dice-weight 2.0 \
  --new-views 600 "${start[@]}" "$@"
