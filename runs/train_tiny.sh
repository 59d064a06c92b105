#!/usr/bin/env bash
# Background training of MediRound-Tiny stage 1 (resumable).
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec nice -n -10 .venv/bin/python -c "
import torch; torch.set_num_threads(2)
from MediRoundCore.train.run import run_training
run_training('runs/tiny', stage=1, steps=int('${STEPS:-1150}'), batch_size=8, progress=True, save_every=50, corpus_dialogues=600)
"
