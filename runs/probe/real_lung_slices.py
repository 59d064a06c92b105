"""Probe: the lungs of the two pyradiomics chest CTs over many axial slices, asked as a user asks (a fresh
session per question, the slice as Slicer extracts it), for several checkpoints side by side. The real-image
validation set asks one slice per case; this spreads the same question over the lungs' extent, so a model change
is not judged on two rounds. Labels: `real_validation.lung_masks` (HU threshold, split at the midline).

    .venv/bin/python runs/probe/real_lung_slices.py CHECKPOINT [CHECKPOINT ...] [--slices 8]
"""

import argparse

import numpy as np

from MediRoundCore.data.real_validation import default_data_dir, lung_masks
from MediRoundCore.engine import Engine
from MediRoundCore.imaging import extract_slice, load_volume
from MediRoundCore.session import Session


def lung_slices(case: str, count: int):
    """(index, slice image, {side: mask}) for `count` axial slices spread over those showing both lungs."""
    volume = load_volume(default_data_dir() / f"{case}_image.nrrd", modality="CT")
    axis_len = volume.array.shape[0]
    found = []
    for index in range(axis_len):
        image = extract_slice(volume, "axial", index)
        lungs = lung_masks(image.pixels)
        if len(lungs) == 2 and min(int(m.sum()) for m in lungs.values()) > 1000:
            found.append((index, image, lungs))
    picks = np.linspace(0, len(found) - 1, min(count, len(found))).round().astype(int)
    return [found[p] for p in sorted(set(picks))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--slices", type=int, default=8)
    args = parser.parse_args()
    cases = {case: lung_slices(case, args.slices) for case in ("lung1", "lung2")}
    for checkpoint in args.checkpoints:
        engine = Engine.load(checkpoint, device="cpu")
        scores = {}
        for case, slices in cases.items():
            for index, image, lungs in slices:
                for side, truth in lungs.items():
                    session = Session(f"{checkpoint}-{case}-{index}-{side}")
                    answer = engine.ask(session, f"Segment the {side}.", image)
                    mask = answer.mask if answer.mask is not None else np.zeros_like(truth)
                    dice = 2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum())
                    scores.setdefault(case, []).append(float(dice))
        every = [d for v in scores.values() for d in v]
        print(checkpoint, {c: round(100 * float(np.mean(v)), 1) for c, v in scores.items()},
              "all", round(100 * float(np.mean(every)), 1), "n", len(every), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
