"""Loads the bundled model and runs the bundled dialogue's first rounds: run by tests/test_slicer_versions.py
with another environment's Python (e.g. transformers 4.57, what pip gives Slicer 5.8's Python 3.9).
Prints one JSON line: versions and each round's entity and mask size."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from MediRoundCore.engine import Engine  # noqa: E402
from MediRoundCore.imaging import extract_slice, load_volume  # noqa: E402
from MediRoundCore.session import Session  # noqa: E402

torch.set_num_threads(1)
data = ROOT / "MediRoundCore" / "data" / "bundled"
dialogue = json.loads((data / "demo_dialogue.json").read_text())[:3]
volume = load_volume(data / "demo_abdomen.nrrd")
engine = Engine.load(None)
session = Session(volume.fingerprint(), None, "demo")
session.volume = volume
rounds = []
for turn in dialogue:
    image = extract_slice(volume, "axial", turn["slice_index"])
    r = engine.ask(session, turn["query"], image).round
    rounds.append({"entity": r.entity, "pixels": int(r.mask.sum()), "answer": r.answer})
print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "rounds": rounds}))
