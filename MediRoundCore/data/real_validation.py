"""Dialogues over real labelled scans, for validation only (never training or selection).

Source: the pyradiomics 3.1.0 test cases (`../shared/data/pyradiomics-3.1.0/data`, BSD-3-Clause; docs/data.md):
chest CT lung1/lung2, brain MR brain1/brain2, breast MR breast1, one lesion label each. Each case gives one
dialogue on its axial slice with the largest label, shown as the engine shows it (`SliceImage.normalized`:
the chest CT through the chest training window, MR by percentiles):

  chest CT   1 "Segment the <side> lung."  (the lung holding the lesion: air-density component, see below)
             2 "Now the lesion inside it."  (the label; refers to round 1)
  MR         1 "Segment the lesion."        (the label)

The lung masks are not labels from the source: they are the two largest air-density (< -400 HU) connected
components that do not touch the slice border (outside air does), with small holes (vessels) filled — the
"five-line HU threshold" of issue 23; patient left is image right (radiologist view). The lung asked for is
the one within 10 px of the lesion, and a solid lesion touching it is part of it (a lung tumour is lung).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..answers import format_answer
from .dataset import Sample

CASES = {"lung1": "CT", "lung2": "CT", "brain1": "MR", "brain2": "MR", "breast1": "MR"}
SOURCE = "pyradiomics-3.1.0"


def default_data_dir() -> Path:
    """$MEDIROUND_REAL_DATA, else shared/data/pyradiomics-3.1.0/data beside the repository (or beside the
    folder holding it, for a git worktree)."""
    env = os.environ.get("MEDIROUND_REAL_DATA")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    candidates = [base / "shared" / "data" / SOURCE / "data" for base in (root.parent, root.parent.parent)]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def lung_masks(hu: np.ndarray) -> dict[str, np.ndarray]:
    """{"left lung", "right lung"} of a display-oriented axial chest CT slice in HU (empty dict if not found)."""
    import SimpleITK as sitk

    air = (hu < -400).astype(np.uint8)
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(air)))
    border = set(np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]])))
    sizes = {int(c): int((components == c).sum()) for c in np.unique(components) if c and c not in border}
    largest = sorted(sizes, key=sizes.get, reverse=True)[:2]
    if len(largest) < 2 or sizes[largest[1]] < 0.01 * hu.size:
        return {}
    masks = []
    for c in largest:
        m = sitk.GetImageFromArray((components == c).astype(np.uint8))
        m = sitk.BinaryMorphologicalClosing(m, [3, 3])
        m = sitk.BinaryFillhole(m)
        masks.append(sitk.GetArrayFromImage(m).astype(bool))
    cols = [np.nonzero(m)[1].mean() for m in masks]
    left, right = (masks[0], masks[1]) if cols[0] > cols[1] else (masks[1], masks[0])  # patient left: image right
    return {"left lung": left & ~right, "right lung": right}


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryDilate(image, [radius, radius])).astype(bool)


def real_sample(case: str, data_dir: str | Path | None = None) -> Sample:
    """The validation dialogue of one case (see the module docstring)."""
    from ..imaging import extract_slice, load_volume

    folder = Path(data_dir) if data_dir else default_data_dir()
    modality = CASES[case]
    volume = load_volume(folder / f"{case}_image.nrrd", modality=modality)
    label_volume = load_volume(folder / f"{case}_label.nrrd", modality="MR")
    areas = (label_volume.array > 0).reshape(label_volume.array.shape[0], -1).sum(1)
    index = int(np.argmax(areas))
    image = extract_slice(volume, "axial", index)
    label = extract_slice(label_volume, "axial", index).pixels > 0
    meta = {"source": SOURCE, "case": case, "slice": index, "view": "axial", "modality": modality,
            "window": image.ct_window()}
    if modality == "CT":
        lungs = lung_masks(image.pixels)
        if lungs:
            near = {name: _dilate(m, 10) for name, m in lungs.items()}
            side = max(lungs, key=lambda name: int((near[name] & label).sum()))
            lung = lungs[side] | label if (near[side] & label).any() else lungs[side]  # a solid tumour is lung
            lesion = f"lesion in the {side}"
            return Sample(image=image.normalized(), queries=[f"Segment the {side}.", "Now the lesion inside it."],
                          answers=[format_answer(side, "the air-filled organ on that side"),
                                   format_answer(lesion, f"the labelled lesion inside the {side}")],
                          masks=np.stack([lung, label]), ref_indices=[None, 0], entities=[side, lesion],
                          meta={**meta, "label_sources": ["HU threshold", "pyradiomics label"]})
    return Sample(image=image.normalized(), queries=["Segment the lesion."],
                  answers=[format_answer("lesion", "the labelled lesion")], masks=label[None], ref_indices=[None],
                  entities=["lesion"], meta={**meta, "label_sources": ["pyradiomics label"]})


def real_samples(data_dir: str | Path | None = None) -> list[Sample]:
    """Every case's dialogue (cases whose files are missing are skipped)."""
    folder = Path(data_dir) if data_dir else default_data_dir()
    return [real_sample(case, folder) for case in CASES if (folder / f"{case}_image.nrrd").is_file()]
