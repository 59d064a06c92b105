#!/usr/bin/env bash
# Background training of MediRound-Tiny stage 1 (resumable).
cd "$(dirname "$0")/.."
exec .venv/bin/python -c "
import torch; torch.set_num_threads(2)
from MediRoundCore.train.run import run_training
run_training('runs/tiny', stage=1, steps=int('${STEPS:-1600}'), batch_size=8, progress=True, save_every=50, corpus_dialogues=600)
"
