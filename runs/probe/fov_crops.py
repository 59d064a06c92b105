"""Probe: the demo dialogue's Dice per round on every demo variant (evaluate/demo_variants.py) for a checkpoint
(the report is `mediround eval --sets variants`).

    .venv/bin/python runs/probe/fov_crops.py [CHECKPOINT]
"""
import sys

import torch

from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.demo_variants import DEMO_VARIANTS, run_demo_dialogue

torch.set_num_threads(1)
engine = Engine.load(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu")
for name in DEMO_VARIANTS:
    print(f"{name:24s}", " ".join(f"{d:.3f}" for d in run_demo_dialogue(engine, name)), flush=True)
