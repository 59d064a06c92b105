"""The bundled demo volume and its labels under geometric changes that keep the anatomy: cropped fields of view
(square and not), axis permutations, flips and a re-spaced header, made with SimpleITK's own filters (which keep
every voxel at its physical place); and the demo dialogue run on each, scored against the labels carried
through the same change.

Used by `mediround eval --sets variants` (QUALITY.md), the behaviour tests of the shipped model
(tests/test_shipped_model.py), the probe runs/probe/fov_crops.py and the mutation check (benchmarks/mutation.py).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "bundled"



def _crop(image, rows=None, cols=None):
    """Crop an (i, j, k) SimpleITK image in the axial plane: rows are j, columns are i (identity direction)."""
    r0, r1 = rows or (0, image.GetSize()[1])
    c0, c1 = cols or (0, image.GetSize()[0])
    return image[c0:c1, r0:r1, :]


def _permute(order):
    import SimpleITK as sitk

    return lambda image: sitk.PermuteAxes(image, list(order))


def _flip(axes):
    import SimpleITK as sitk

    return lambda image: sitk.Flip(image, list(axes), flipAboutOrigin=False)


def _then(*steps):
    def apply(image):
        for step in steps:
            image = step(image)
        return image
    return apply


# name -> function of a SimpleITK image (same function for the volume and its labels)
DEMO_VARIANTS = {
    "original": lambda image: image,
    # fields of view cropped around the body (axial slice: body rows 48-217, columns 7-240)
    "crop_176x256": lambda image: _crop(image, rows=(40, 216)),  # 176 rows x 256 columns, wide
    "crop_256x216": lambda image: _crop(image, cols=(20, 236)),  # 256 rows x 216 columns, tall
    # fields of view that cut into the body, every target whole (targets: rows 82-181, columns 86-208)
    "cut_256x176": lambda image: _crop(image, cols=(48, 224)),  # tall; body cut left and right
    "cut_160x256": lambda image: _crop(image, rows=(56, 216)),  # wide; body cut top and bottom
    "cut_200x160_offcentre": lambda image: _crop(image, rows=(40, 240), cols=(62, 222)),
    "cut_136x144_tight": lambda image: _crop(image, rows=(64, 200), cols=(72, 216)),
    "permuted_kij": _permute((2, 0, 1)),  # voxel axes reordered; display must be unchanged
    "permuted_jik": _permute((1, 0, 2)),
    "flipped_ij": _flip((True, True, False)),
    "flipped_k": _flip((False, False, True)),
    "permuted_flipped": _then(_permute((1, 2, 0)), _flip((True, False, True))),
    "crop_permuted": _then(lambda image: _crop(image, rows=(40, 216)), _permute((2, 1, 0)),
                           _flip((False, True, False))),
}

KINDS = {name: ("the bundled volume" if name == "original" else
                "field of view cut into the body" if name.startswith("cut_") else
                "field of view around the body" if name.startswith("crop_") and "permuted" not in name else
                "re-oriented copy")
         for name in DEMO_VARIANTS}


@lru_cache(maxsize=1)
def _bundled_images():
    import SimpleITK as sitk

    return (sitk.ReadImage(str(BUNDLED / "demo_abdomen.nrrd")),
            sitk.ReadImage(str(BUNDLED / "demo_abdomen_labels.nrrd")),
            json.loads((BUNDLED / "demo_dialogue.json").read_text()))


def _volume(image, name):
    import SimpleITK as sitk

    from ..imaging import Volume

    return Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                  np.asarray(image.GetDirection()).reshape(3, 3), name=name)


def demo_variant(name: str):
    """(volume, labels, axial slice index, dialogue) of a variant: the axial slice is the one through the
    physical centre of the demo's slice."""
    image, labels, dialogue = _bundled_images()
    change = DEMO_VARIANTS[name]
    moved, moved_labels = change(image), change(labels)
    k = dialogue[0]["slice_index"]
    centre = image.TransformContinuousIndexToPhysicalPoint((127.5, 127.5, float(k)))
    volume = _volume(moved, f"demo_{name}")
    index_ijk = moved.TransformPhysicalPointToIndex(centre)
    index = int(index_ijk[volume.view_axis("axial")])
    return volume, _volume(moved_labels, f"labels_{name}"), index, dialogue


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / denom) if denom else 1.0


def run_demo_dialogue(engine, name: str = "original", volume=None, labels=None, index=None,
                      beta: float | None = None) -> list[float]:
    """Dice per round of the demo dialogue on a variant (the round's mask on its displayed slice against the
    labels' same displayed slice; each round's reference as the script picks it; JCM on at `beta`)."""
    from ..imaging import extract_slice
    from ..session import Session

    v, lab, idx, dialogue = demo_variant(name)
    volume, labels, index = volume or v, labels or lab, idx if index is None else index
    session = Session(volume.fingerprint())
    session.volume = volume
    image = extract_slice(volume, "axial", index)
    truth = extract_slice(labels, "axial", index).pixels
    scores = []
    for step in dialogue:
        ref = None if step.get("refers_to") is None else step["refers_to"] + 1
        mask = engine.ask(session, step["query"], image, reference=ref, beta=beta).mask
        scores.append(dice(mask, truth == step["expected_label"]))
    return scores
