"""Probe: the demo dialogue's Dice per round on every demo variant (tests/demo_variants.py) for a checkpoint.

    .venv/bin/python runs/probe/fov_crops.py [CHECKPOINT]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import torch  # noqa: E402

from demo_variants import DEMO_VARIANTS, run_demo_dialogue  # noqa: E402
from MediRoundCore.engine import Engine  # noqa: E402

torch.set_num_threads(1)
engine = Engine.load(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu")
for name in DEMO_VARIANTS:
    print(f"{name:24s}", " ".join(f"{d:.3f}" for d in run_demo_dialogue(engine, name)), flush=True)
