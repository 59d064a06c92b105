"""Validation dialogues over the real labelled scans: shown as the engine shows them, lungs from HU, the
lesion label inside the lung asked for, patient sides from the radiologist view."""

import numpy as np
import pytest

from MediRoundCore.data.real_validation import CASES, default_data_dir, lung_masks, real_sample
from MediRoundCore.imaging import extract_slice, load_volume

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="real labelled volumes not on this machine")


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_chest_dialogue(case):
    sample = real_sample(case)
    lung, lesion = sample.masks
    assert sample.ref_indices == [None, 0] and sample.entities[1] == f"lesion in the {sample.entities[0]}"
    assert sample.meta["window"] == (-350.0, 1400.0) and 0 <= sample.image.min() and sample.image.max() <= 1
    assert (lung & lesion).sum() == lesion.sum() > 0  # the lesion lies in the lung asked for
    hu = extract_slice(load_volume(DATA / f"{case}_image.nrrd"), "axial", sample.meta["slice"]).pixels
    assert np.median(hu[lung & ~lesion]) < -600  # aerated lung
    lungs = lung_masks(hu)
    left, right = np.nonzero(lungs["left lung"])[1].mean(), np.nonzero(lungs["right lung"])[1].mean()
    assert left > hu.shape[1] / 2 > right  # patient left on image right
    assert 0.03 < lungs["left lung"].mean() < 0.3 and 0.03 < lungs["right lung"].mean() < 0.3


@pytest.mark.parametrize("case", ["brain1", "brain2", "breast1"])
def test_mr_dialogue(case):
    sample = real_sample(case)
    assert CASES[case] == "MR" and sample.queries == ["Segment the lesion."] and sample.meta["window"] is None
    assert sample.masks.shape[1:] == sample.image.shape and sample.masks[0].sum() > 0
