"""Generated anatomy: determinism, nesting, patient sides on slices and on flipped-direction volumes."""

import numpy as np
import pytest
import SimpleITK as sitk

from MediRoundCore.data.anatomy import generate_slice, generate_volume


@pytest.mark.parametrize("region", ["abdomen", "chest", "brain"])
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_slice_deterministic_and_well_formed(region, modality):
    a = generate_slice(region, 11, modality=modality, paired=True)
    b = generate_slice(region, 11, modality=modality, paired=True)
    c = generate_slice(region, 12, modality=modality, paired=True)
    assert a.image.dtype == np.float32 and a.image.shape == (256, 256)
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    assert [i.name for i in a.instances] == [i.name for i in b.instances]
    names = [i.name for i in a.instances]
    assert len(names) == len(set(names))
    for inst in a.instances:
        assert inst.mask.dtype == bool and inst.mask.sum() == inst.area >= 12
        if inst.parent is not None:  # lesions and parts lie inside their organ
            assert not (inst.mask & ~a.instance(inst.parent).mask).any(), inst.name
        if inst.name.startswith(("left ", "right ")):
            assert inst.side == inst.name.split()[0], inst.name
    d = a.display()
    assert d.min() >= 0 and d.max() <= 1


def test_abdomen_layout_in_display_orientation():
    sl = generate_slice("abdomen", 3, modality="CT", noise_level=0.0, contrast=1.0, paired=True)
    col = lambda n: np.nonzero(sl.instance(n).mask)[1].mean()  # noqa: E731
    row = lambda n: np.nonzero(sl.instance(n).mask)[0].mean()  # noqa: E731
    # patient LEFT on image RIGHT: spleen and left kidney at larger columns than liver and right kidney
    assert col("left kidney") > col("right kidney") and col("spleen") > col("liver")
    assert row("vertebra") > row("aorta")  # anterior at the top
    liver = sl.instance("liver")
    assert 20 < sl.image[liver.mask].mean() < 110  # ~60 HU
    assert sl.image[sl.instance("left kidney").mask].mean() > 110  # enhanced
    lung = generate_slice("chest", 3, modality="CT", noise_level=0.0).instance("left lung")
    assert lung.side == "left"
    chest = generate_slice("chest", 3, modality="CT", noise_level=0.0)
    assert chest.image[lung.mask].mean() < -600


def test_noise_and_contrast_parameters():
    lo = generate_slice("abdomen", 4, noise_level=0.0, contrast=0.5)
    hi = generate_slice("abdomen", 4, noise_level=1.0, contrast=1.5)
    body = lo.instance("liver").mask
    assert hi.image[body].std() > lo.image[body].std()
    k, li = lo.instance("left kidney").mask, lo.instance("liver").mask
    assert abs(hi.image[k].mean() - hi.image[li].mean()) > abs(lo.image[k].mean() - lo.image[li].mean())


def _centroid_x(vol, name):
    k, j, i = np.nonzero(vol.mask(name))
    return vol.labels.TransformContinuousIndexToPhysicalPoint((i.mean(), j.mean(), k.mean()))[0]


@pytest.mark.parametrize("flip", [(False, False, False), (True, False, False), (True, True, True)])
def test_volume_left_right_in_patient_coordinates(flip):
    vol = generate_volume("abdomen", 5, shape=(72, 72, 8), spacing=(0.8, 0.8, 2.5), flip=flip,
                          lesions={"left kidney": 0, "right kidney": 0})
    assert vol.image.GetSpacing() == (0.8, 0.8, 2.5) and vol.image.GetOrigin() != (0.0, 0.0, 0.0)
    assert np.allclose(np.array(vol.image.GetDirection()).reshape(3, 3), np.diag([-1 if f else 1 for f in flip]))
    assert vol.image.GetPixelID() == sitk.sitkInt16
    # LPS: patient left has the larger x
    assert _centroid_x(vol, "left kidney") > _centroid_x(vol, "right kidney")
    assert _centroid_x(vol, "spleen") > _centroid_x(vol, "liver")
    assert vol.sides["left kidney"] == "left" and vol.sides["right kidney"] == "right"
    # TransformIndexToPhysicalPoint on one voxel of each kidney agrees
    k, j, i = np.nonzero(vol.mask("left kidney"))
    left = vol.labels.TransformIndexToPhysicalPoint((int(i[0]), int(j[0]), int(k[0])))[0]
    k, j, i = np.nonzero(vol.mask("right kidney"))
    right = vol.labels.TransformIndexToPhysicalPoint((int(i[0]), int(j[0]), int(k[0])))[0]
    assert left > right


def test_flipped_volume_is_mirrored_array_of_same_anatomy():
    kw = dict(shape=(64, 64, 6), lesions={"left kidney": 0, "right kidney": 0}, noise_level=0.0)
    plain = generate_volume("abdomen", 8, **kw)
    flipped = generate_volume("abdomen", 8, flip=(True, False, False), origin=(
        plain.image.TransformIndexToPhysicalPoint((63, 0, 0))[0], -130.0, 415.0), **kw)
    a = sitk.GetArrayFromImage(plain.labels)
    b = sitk.GetArrayFromImage(flipped.labels)
    assert (a == b[:, :, ::-1]).mean() > 0.99
