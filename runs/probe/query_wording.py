"""How the shipped model takes other wordings of the demo's rounds (README and design notes quote it).

    .venv/bin/python runs/probe/query_wording.py

Runs the bundled demo dialogue with one round's query replaced by each variant (the same reference as the
demo's), and prints that round's Dice against the generator's labels and the answer.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from MediRoundCore.cli import BUNDLED, _dice, _display_like
from MediRoundCore.engine import Engine
from MediRoundCore.imaging import extract_slice, load_volume
from MediRoundCore.session import Session

VARIANTS = {  # demo round (0-based) -> wordings
    1: ["Now the lesion inside it.", "Now the lesion inside the left kidney."],
    3: ["Now segment the organ that removes old red blood cells on the same side as it.",
        "Now the organ that removes old red blood cells, on the same side as it.",
        "Now the organ that removes old red blood cells, on the same side as the kidney.",
        "Show me the organ that removes old red blood cells on the same side as it.",
        "Which structure is the organ that removes old red blood cells on the same side as it? Segment it."],
}


def main() -> None:
    torch.set_num_threads(2)
    volume = load_volume(BUNDLED / "demo_abdomen.nrrd")
    labels = load_volume(BUNDLED / "demo_abdomen_labels.nrrd").array
    script = json.loads((BUNDLED / "demo_dialogue.json").read_text())
    engine = Engine.load()
    for target, wordings in VARIANTS.items():
        for wording in wordings:
            session = Session(volume.fingerprint())
            for k, step in enumerate(script[: target + 1]):
                image = extract_slice(volume, "axial", step["slice_index"])
                reference = None if step["refers_to"] is None else step["refers_to"] + 1
                result = engine.ask(session, wording if k == target else step["query"], image, reference=reference)
            truth = _display_like(image, np.take(labels, step["slice_index"], axis=0) == step["expected_label"])
            print(f"round {target + 1}  Dice {_dice(result.mask, truth):.3f}  {wording!r} -> {result.round.entity}")


if __name__ == "__main__":
    main()
