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


@pytest.mark.parametrize("case", ["lung1", "lung2", "brain2"])
def test_a_real_slice_is_evaluated_as_a_users_ask_shows_it(case):
    """The evaluator's slice of a real case (`protocol.sample_image`) meets the model exactly as the slice a user
    asks on in Slicer (`extract_slice` of the file): same pixels in [0,1], share of the field and padding to its
    place in patient coordinates. Before, the evaluator's slice filled the frame: a 292-mm chest CT was magnified
    1.3x, which no user's Ask does."""
    from MediRoundCore.evaluate.protocol import sample_image
    from MediRoundCore.model import tiny_config
    from MediRoundCore.model.field_placement import slice_in_field

    config = tiny_config()
    sample = real_sample(case)
    asked = extract_slice(load_volume(DATA / f"{case}_image.nrrd", modality=CASES[case]), "axial",
                          sample.meta["slice"])
    evaluated = slice_in_field(sample_image(sample), config)
    shown = slice_in_field(asked, config)
    assert np.array_equal(evaluated[0], shown[0]) and evaluated[1:] == shown[1:]
    if CASES[case] == "CT":
        assert shown[1] is not None and shown[1] != (1.0, 1.0)  # at the physical scale, not filling the frame


@pytest.mark.parametrize("case", ["brain1", "brain2", "breast1"])
def test_mr_dialogue(case):
    sample = real_sample(case)
    assert CASES[case] == "MR" and sample.queries == ["Segment the lesion."] and sample.meta["window"] is None
    assert sample.masks.shape[1:] == sample.image.shape and sample.masks[0].sum() > 0


def _mni_or_skip():
    from MediRoundCore.data.real_validation import mni152_folder

    folder = mni152_folder()
    if folder is None:
        pytest.skip("MNI152 files not fetched (python -m MediRoundCore.data.real_validation fetch)")
    return folder


def test_mni152_hemispheres_lie_on_their_own_side_in_physical_space():
    """Each hemisphere's mask, put back into the template's voxels, lies on its side of x = 0 (LPS: +x is the
    patient's left); on the display, patient left is image right."""
    import SimpleITK as sitk

    from MediRoundCore.data.real_validation import MNI152, mni152_sample
    from MediRoundCore.imaging import mask_into_volume

    folder = _mni_or_skip()
    sample = mni152_sample(folder)
    assert sample.entities == ["left hemisphere", "right hemisphere"] and sample.ref_indices == [None, 0]
    left, right = sample.masks
    assert not (left & right).any() and 0.1 < left.mean() < 0.35 and 0.1 < right.mean() < 0.35
    assert np.nonzero(left)[1].mean() > sample.image.shape[1] / 2 > np.nonzero(right)[1].mean()
    t1 = folder / next(iter(MNI152.files))
    volume = load_volume(t1, modality="MR")
    image = extract_slice(volume, "axial", sample.meta["slice"])
    reference = sitk.ReadImage(str(t1))
    for mask, sign in ((left, 1), (right, -1)):
        voxels = np.argwhere(mask_into_volume(volume, image, mask))  # (k, j, i)
        xs = np.array([reference.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))[0]
                       for k, j, i in voxels[:: max(1, len(voxels) // 500)]])
        assert len(xs) and np.all(sign * xs > 0)
    assert sample.image.min() >= 0 and sample.image.max() <= 1


def test_mni152_files_are_hash_checked(tmp_path):
    import shutil

    from MediRoundCore.checkpoints.base_weights import locate_spec
    from MediRoundCore.data.real_validation import MNI152
    from MediRoundCore.errors import CheckpointError

    folder = _mni_or_skip()
    for name in MNI152.files:
        shutil.copyfile(folder / name, tmp_path / name)
    assert locate_spec(MNI152, tmp_path) == tmp_path
    damaged = tmp_path / next(iter(MNI152.files))
    damaged.write_bytes(damaged.read_bytes()[:-1])  # a truncated copy
    with pytest.raises(CheckpointError, match="sha256 .* differs from the pinned"):
        locate_spec(MNI152, tmp_path)


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_lung_extent_dialogues_spread_over_the_slices_showing_both_lungs(case):
    from MediRoundCore.data.real_validation import EXTENT_SLICES, LUNG_MIN_PIXELS, lung_extent_samples

    samples = lung_extent_samples(case)
    volume = load_volume(DATA / f"{case}_image.nrrd", modality="CT")

    def both_lungs(index):
        lungs = lung_masks(extract_slice(volume, "axial", index).pixels)
        return bool(lungs) and min(int(m.sum()) for m in lungs.values()) > LUNG_MIN_PIXELS

    showing = [i for i in range(volume.array.shape[0]) if both_lungs(i)]
    slices = [s.meta["slice"] for s in samples]
    assert len(slices) == EXTENT_SLICES and slices == sorted(set(slices)) and set(slices) <= set(showing)
    assert slices[0] == showing[0] and slices[-1] == showing[-1]  # the whole extent, its ends included
    for sample in samples:
        left, right = sample.masks
        assert sample.queries == ["Segment the left lung.", "Segment the right lung."]
        assert sample.ref_indices == [None, None] and sample.meta["window"] == (-350.0, 1400.0)
        assert np.nonzero(left)[1].mean() > sample.image.shape[1] / 2 > np.nonzero(right)[1].mean()
        assert not (left & right).any() and min(left.sum(), right.sum()) > LUNG_MIN_PIXELS
