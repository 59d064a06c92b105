"""A slice smaller than the model's field lies in the frame where its patient coordinates put it
(`model/field_placement.py`): a crop of a scan meets the model exactly where the same anatomy lay in the whole
scan, in any voxel orientation, and training crops are shown the same way. Issue 26: centring a crop put its
anatomy at another phase of the tiny model's 16-px patches, which alone moved a target's Dice by up to 0.15."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from MediRoundCore.imaging import SliceImage, Volume, extract_slice
from MediRoundCore.model import tiny_config
from MediRoundCore.model.field_placement import NO_PADDING, field_padding, slice_in_field
from MediRoundCore.model.processing import segmenter_pixels

CFG = tiny_config()
SIZE = CFG.segmenter.image_size
SPACING = CFG.field_of_view_mm["abdomen"] / SIZE  # a whole slice of SIZE pixels is exactly the field


def _scan(seed=0, shape=(5, SIZE, SIZE)):
    """A CT volume whose axial slices are the field exactly, centred on the patient origin; every voxel differs."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-150, 230, size=shape).astype(np.int16)  # inside the abdominal window: no clipping
    origin = (-(shape[2] - 1) / 2 * SPACING, -(shape[1] - 1) / 2 * SPACING, 10.0)
    return Volume(array, (SPACING, SPACING, 3.0), origin, np.eye(3), modality="CT", region="abdomen")


def _sitk(volume):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction.ravel().tolist())
    return image


def _volume(image):
    import SimpleITK as sitk

    return Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                  np.asarray(image.GetDirection()).reshape(3, 3), modality="CT", region="abdomen")


def _axial_through(image, point):
    volume = _volume(image)
    index = image.TransformPhysicalPointToIndex(point)[volume.view_axis("axial")]
    return extract_slice(volume, "axial", int(index))


def _framed(image: SliceImage):
    pixels, extent, padding = slice_in_field(image, CFG)
    seg, hw = segmenter_pixels(pixels, CFG, extent)
    # where the slice's own pixels lie in the frame: the same placement applied to an all-ones slice
    ones, ones_extent, _ = slice_in_field(SliceImage(np.ones_like(image.pixels), image.view, image.index, image.axis,
                                                     image.transpose, image.flip_rows, image.flip_cols, "normalized",
                                                     image.spacing, image.region, None, image.centre_mm), CFG)
    inside = segmenter_pixels(ones, CFG, ones_extent)[0][0] > 0.5
    return seg, inside, padding


ORIENTATIONS = {
    "as stored": lambda image: image,
    "permuted": lambda image: __import__("SimpleITK").PermuteAxes(image, [1, 0, 2]),
    "flipped": lambda image: __import__("SimpleITK").Flip(image, [True, True, False], flipAboutOrigin=False),
    "permuted and flipped": lambda image: __import__("SimpleITK").Flip(
        __import__("SimpleITK").PermuteAxes(image, [1, 0, 2]), [False, True, False], flipAboutOrigin=False),
}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("rows, cols", [((0, SIZE), (48, 224)), ((56, 216), (0, SIZE)), ((40, 240), (62, 222)),
                                        ((64, 200), (72, 216)), ((3, 100), (150, 253))])
def test_a_crop_of_a_scan_meets_the_model_where_it_lay_in_the_whole_scan(orientation, rows, cols):
    """SimpleITK cuts a field of view out of a scan (keeping every voxel's physical place), the voxel axes are
    reordered or flipped: the crop's frame pixels are the whole scan's frame pixels at the same frame positions,
    and black elsewhere."""
    whole = _sitk(_scan())
    crop = whole[cols[0]:cols[1], rows[0]:rows[1], :]
    point = whole.TransformIndexToPhysicalPoint((0, 0, 2))
    turn = ORIENTATIONS[orientation]
    seg_whole, inside_whole, padding_whole = _framed(_axial_through(turn(whole), point))
    seg_crop, inside, padding = _framed(_axial_through(turn(crop), point))
    assert padding_whole == NO_PADDING and bool(inside_whole.all())
    assert int(inside.sum()) == (rows[1] - rows[0]) * (cols[1] - cols[0])
    assert torch.equal(seg_crop[:, inside], seg_whole[:, inside])
    assert torch.equal(seg_crop[:, ~inside], torch.full_like(seg_crop[:, ~inside], float(seg_crop.min())))
    # the displayed crop is where the whole slice shows it: rows and columns as displayed, not as stored
    ys, xs = np.nonzero(inside.numpy())
    assert (ys.min(), xs.min()) == (rows[0], cols[0])


def test_the_slice_centre_is_its_patient_position_along_the_display_directions():
    """`SliceImage.centre_mm` against SimpleITK's own index-to-physical mapping: the mean position of the four
    displayed corner pixels, projected on the directions in which displayed rows and columns advance."""
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    for turn in ORIENTATIONS.values():
        base = _sitk(_scan(shape=(6, 40, 52)))
        base.SetOrigin(tuple(rng.uniform(-200, 200, 3)))
        image = turn(base)
        volume = _volume(image)
        for view in ("axial", "coronal", "sagittal"):
            index = int(rng.integers(0, volume.num_slices(view)))
            sl = extract_slice(volume, view, index)
            h, w = sl.pixels.shape

            def physical(r, c, sl=sl, volume=volume, index=index):
                one = np.zeros((h, w), bool)
                one[r, c] = True
                plane = np.argwhere(sl.to_plane(one))[0]  # array-order (row, col) of the plane
                kji = [None, None, None]
                free = [a for a in (0, 1, 2) if a != 2 - sl.axis]
                kji[2 - sl.axis] = index
                kji[free[0]], kji[free[1]] = int(plane[0]), int(plane[1])
                return np.array(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in kji[::-1])))

            corners = [physical(r, c) for r in (0, h - 1) for c in (0, w - 1)]
            centre = np.mean(corners, axis=0)
            down = physical(min(1, h - 1), 0) - physical(0, 0)
            right = physical(0, min(1, w - 1)) - physical(0, 0)
            expected = (centre @ down / np.linalg.norm(down), centre @ right / np.linalg.norm(right))
            assert sl.centre_mm == pytest.approx(expected, abs=1e-6), (view, sitk.GetArrayFromImage(image).shape)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(4, 400), w=st.integers(4, 400), er=st.floats(0.05, 1.6), ec=st.floats(0.05, 1.6),
       sy=st.floats(-2.0, 2.0), sx=st.floats(-2.0, 2.0))
def test_the_padding_stays_inside_the_field(h, w, er, ec, sy, sx):
    """Padding never makes a slice larger than the field (or than its own longest side, when that is larger), is
    added only on the side towards the field's centre, and comes off again exactly."""
    padding = field_padding((h, w), (er, ec), (sy, sx))
    ph, pw = padding.padded_hw((h, w))
    pr, pc = padding.padded_extent((h, w), (er, ec))
    longest = max(er, ec, 1.0)
    assert pr <= longest * (1 + 1e-6) + er / h and pc <= longest * (1 + 1e-6) + ec / w
    scale = 1 / max(er, ec, 1.0)
    if abs(sy) * scale + er * scale / 2 > 0.5 + er * scale / h:
        assert padding.top == padding.bottom == 0  # reaches outside the field: centred
    if abs(sx) * scale + ec * scale / 2 > 0.5 + ec * scale / w:
        assert padding.left == padding.right == 0
    assert (padding.top == 0 or sy > 0) and (padding.bottom == 0 or sy < 0)
    assert (padding.left == 0 or sx > 0) and (padding.right == 0 or sx < 0)
    array = np.arange(h * w, dtype=np.float32).reshape(h, w)
    padded = padding.pad(array)
    assert padded.shape == (ph, pw)
    assert np.array_equal(padding.unpad(padded), array)
    assert field_padding((h, w), (er, ec), (0.0, 0.0)) == NO_PADDING
    assert field_padding((h, w), None, (sy, sx)) == field_padding((h, w), (er, ec), None) == NO_PADDING


def test_a_slice_reaching_outside_the_origin_centred_field_is_centred_along_that_axis():
    """A scan not centred on the patient origin (pyradiomics' lung1: 512 px of 0.57 mm, its centre 179 mm
    anterior of the origin) is centred along that axis, as before, not pushed against the frame's edge; along the
    other axis, where it lies inside the field, it still goes to its place."""
    mm = 0.5703125
    field = CFG.field_of_view_mm["chest"]
    extent = (512 * mm / field, 512 * mm / field)
    padding = field_padding((512, 512), extent, (-179.3 / field, -12.0 / field))
    assert (padding.top, padding.bottom) == (0, 0)
    assert (padding.left, padding.right) == (0, round(2 * 12.0 / mm))
    # a crop of its posterior half reaches outside the field too: centred, as the whole slice is
    assert field_padding((256, 512), (256 * mm / field, extent[1]), ((-179.3 + 73.0) / field, 0.0)).top == 0
    # inside the field (a scan centred on the origin): to its place, by exactly twice its offset
    inside = field_padding((256, 512), (256 * mm / field, extent[1]), (73.0 / field, 0.0))
    assert (inside.top, inside.bottom) == (round(2 * 73.0 / mm), 0)


def test_training_crops_are_shown_where_they_lay_in_the_whole_slice():
    """`crop_sample` records the crop's place; the batcher pads it there (as the engine pads a cropped scan): the
    crop's frame pixels are the whole slice's at the same frame positions, for any random crop."""
    from MediRoundCore.data.anatomy import generate_slice
    from MediRoundCore.data.dataset import Sample
    from MediRoundCore.data.field_of_view import crop_sample
    from MediRoundCore.train.batching import make_batch, sample_in_field

    whole_image = generate_slice("abdomen", seed=3).display().astype(np.float32)
    masks = np.zeros((1, SIZE, SIZE), bool)
    masks[0, 100:140, 90:150] = True
    whole = Sample(image=whole_image, queries=["Segment it."], answers=["It. [SEG]"], masks=masks,
                   ref_indices=[None], entities=["it"])
    seg_whole, _ = segmenter_pixels(whole_image, CFG, (1.0, 1.0))
    rng = np.random.default_rng(0)
    for _ in range(12):
        crop = crop_sample(rng, whole)
        r0, c0, rows, cols = crop.meta["field_of_view"]
        image, crop_masks, extent = sample_in_field(crop, CFG)
        seg, hw = segmenter_pixels(image, CFG, extent)
        assert torch.equal(seg[:, r0:r0 + rows, c0:c0 + cols], seg_whole[:, r0:r0 + rows, c0:c0 + cols])
        assert np.array_equal(crop_masks[0][r0 - (SIZE - hw[0]) // 2:, c0 - (SIZE - hw[1]) // 2:][:rows, :cols],
                              masks[0, r0:r0 + rows, c0:c0 + cols])
    # the batch's targets are the whole slice's mask at the same frame positions
    from MediRoundCore.model.processing import PromptBuilder  # noqa: F401
    from MediRoundCore.engine import Engine

    engine = Engine.random_tiny(seed=0)
    batch = make_batch([crop], engine.builder, engine.model.config)
    target = batch.target_masks[0].numpy() > 0
    assert np.array_equal(target[r0:r0 + rows, c0:c0 + cols], masks[0, r0:r0 + rows, c0:c0 + cols])
    assert not target[:r0].any() and not target[:, :c0].any()


def test_the_engine_answers_a_crop_at_its_shape_and_encodes_a_moved_slice_again(tiny_engine):
    """The mask comes back at the crop's own shape (the padding taken off), and the same pixels at another place
    in patient coordinates are another encoding (the slice cache is keyed by the place)."""
    from MediRoundCore.session import Session

    whole = _sitk(_scan(seed=4))
    crop = whole[48:224, :, :]
    image = _axial_through(crop, whole.TransformIndexToPhysicalPoint((0, 0, 2)))
    assert slice_in_field(image, tiny_engine.model.config)[2] != NO_PADDING
    session = Session("placement-test")
    result = tiny_engine.ask(session, "Segment the liver.", image)
    assert result.mask.shape == image.pixels.shape
    moved = SliceImage(image.pixels, image.view, image.index, image.axis, image.transpose, image.flip_rows,
                       image.flip_cols, image.modality, image.spacing, image.region, image.window,
                       (image.centre_mm[0], image.centre_mm[1] - 40.0))
    assert "segmenter_encoder_ms" not in tiny_engine.prepare(session, image)
    assert "segmenter_encoder_ms" in tiny_engine.prepare(session, moved)
