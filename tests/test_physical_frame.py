"""The model sees a slice at the physical scale it was trained at (`MediRoundConfig.field_of_view_mm`): a scan
whose field of view cuts into the body keeps the size of its anatomy (padded, never magnified), anisotropic
pixels become square, and everything that places the slice in the frame (pixels, targets, reference box, the
mask coming back, the engine's cache) agrees. Issue 26: crops of the demo volume that cut into the body were
magnified to fill the frame, and the shipped model lost targets near the cut."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from MediRoundCore.data.anatomy import FOV_MM, generate_slice
from MediRoundCore.errors import ConfigError
from MediRoundCore.imaging import SliceImage
from MediRoundCore.model import tiny_config
from MediRoundCore.model.config import MediRoundConfig, full_config
from MediRoundCore.model.processing import (frame_box, frame_hw, frame_shares, logits_to_slice,
                                            masks_to_segmenter_frame, reference_inputs, segmenter_pixels,
                                            vision_pixels)

CFG = tiny_config()
SIZE = CFG.segmenter.image_size


def _slice(pixels, spacing, region="abdomen", modality="CT"):
    return SliceImage(pixels=np.asarray(pixels, np.float32), view="axial", index=0, axis=2, transpose=False,
                      flip_rows=False, flip_cols=False, modality=modality, spacing=spacing, region=region)


def test_the_presets_train_at_the_generators_field_of_view():
    assert tiny_config().field_of_view_mm == {k: float(v) for k, v in FOV_MM.items()}
    assert full_config().field_of_view_mm == {}  # LLaVA-Med + MedSAM: trained on real scans of any scale
    legacy = CFG.to_dict()
    del legacy["field_of_view_mm"]  # a checkpoint written before the field: slices fill the frame, as then
    assert MediRoundConfig.from_dict(legacy).field_of_view_mm == {}
    for bad in ({"abdomen": 0}, {"abdomen": -380}, {"abdomen": "wide"}, {"abdomen": float("inf")}):
        with pytest.raises(ConfigError, match="field_of_view_mm"):
            MediRoundConfig.from_dict({**CFG.to_dict(), "field_of_view_mm": bad})


def test_frame_extent_is_the_physical_size_over_the_field():
    image = _slice(np.zeros((100, 300)), spacing=(1.9, 0.5))  # 190 mm tall, 150 mm wide
    assert image.frame_extent(CFG.field_of_view_mm) == pytest.approx((190 / 380, 150 / 380))
    brain = _slice(np.zeros((100, 300)), spacing=(1.9, 0.5), region="brain")
    assert brain.frame_extent(CFG.field_of_view_mm) == pytest.approx((190 / 230, 150 / 230))
    assert _slice(np.zeros((8, 8)), (1, 1), region=None, modality="MR").frame_extent(CFG.field_of_view_mm) is None
    assert image.frame_extent({}) is None


@pytest.mark.parametrize("extent, expected", [
    (None, (1.0, 0.5)),  # unknown: the longest side fills the frame
    ((0.5, 0.25), (0.5, 0.25)),  # inside the field: the training scale, padded
    ((2.0, 1.0), (1.0, 0.5)),  # larger than the field: shrunk to fit, aspect kept
    ((1.0, 1.0), (1.0, 1.0)),
])
def test_frame_shares(extent, expected):
    assert frame_shares((200, 100), extent) == pytest.approx(expected)


def test_a_crop_keeps_the_size_of_its_anatomy():
    """A window cut out of a generated slice (drawn at the training scale) lands in the frame at the training
    scale: its pixels are exactly the full slice's frame pixels at the same place, shifted by the centring."""
    full = generate_slice("abdomen", seed=3).display().astype(np.float32)
    assert full.shape == (SIZE, SIZE)
    seg_full, _ = segmenter_pixels(full, CFG, (1.0, 1.0))
    for r0, c0, h, w in [(40, 62, 200, 160), (64, 72, 136, 144), (0, 48, 256, 176)]:
        crop = full[r0:r0 + h, c0:c0 + w]
        seg, hw = segmenter_pixels(crop, CFG, (h / SIZE, w / SIZE))
        assert hw == (h, w)
        top, left = (SIZE - h) // 2, (SIZE - w) // 2
        assert torch.equal(seg[:, top:top + h, left:left + w], seg_full[:, r0:r0 + h, c0:c0 + w])
        padding = seg.clone()
        padding[:, top:top + h, left:left + w] = 0
        assert not padding.any()  # black around it (minmax: black is 0)
        # the old framing magnified the same crop: the anatomy grew by SIZE / max(h, w)
        assert segmenter_pixels(crop, CFG)[1] == frame_hw((h, w), SIZE)
        assert max(segmenter_pixels(crop, CFG)[1]) == SIZE


def test_anisotropic_pixels_come_out_square():
    """A disc of 60 mm drawn in physical millimetres on pixels of 2.0 × 0.5 mm (an ellipse in the array) is a
    disc in the frame: as tall as wide, 60 mm at the field's scale."""
    rows, cols, spacing = 120, 480, (2.0, 0.5)
    yy, xx = np.mgrid[:rows, :cols]
    disc = ((yy + 0.5) * spacing[0] - 120) ** 2 + ((xx + 0.5) * spacing[1] - 120) ** 2 <= 30 ** 2
    image = _slice(disc.astype(np.float32), spacing)
    extent = image.frame_extent(CFG.field_of_view_mm)
    seg, hw = segmenter_pixels(disc.astype(np.float32), CFG, extent)
    bright = (seg[0] > seg[0].min() + 0.5).numpy()
    ys, xs = np.nonzero(bright)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert abs(height - width) <= 2, (height, width)
    assert abs(height - 60 / (380 / SIZE)) <= 2


@settings(max_examples=60, deadline=None)
@given(h=st.integers(12, 300), w=st.integers(12, 300), row_mm=st.floats(0.3, 5.0), col_mm=st.floats(0.3, 5.0),
       seed=st.integers(0, 10_000))
def test_pixels_targets_box_and_mask_share_one_placement(h, w, row_mm, col_mm, seed):
    """For any slice shape and pixel spacing (up to 5 mm, e.g. a sagittal view of thick slices): the reference
    box says where the training target of a mask lies in the frame, the segmenter and vision pixels of the mask's
    image light up there, and the target read back as logits returns the mask's pixels."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), bool)
    y0, x0 = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
    mask[y0:y0 + int(rng.integers(6, h - y0 + 1)), x0:x0 + int(rng.integers(6, w - x0 + 1))] = True
    extent = _slice(np.zeros((h, w)), (row_mm, col_mm)).frame_extent(CFG.field_of_view_mm)
    seg, hw = segmenter_pixels(mask.astype(np.float32), CFG, extent)
    target = masks_to_segmenter_frame(mask[None], hw, SIZE)[0].numpy() > 0
    bright = (seg[0] > 0.5).numpy()  # minmax pixels: the mask drawn at 1 on 0
    ys, xs = np.nonzero(target)
    bys, bxs = np.nonzero(bright)
    if len(ys) == 0 or len(bys) == 0:  # a mask thinner than a frame pixel
        return
    tol_y, tol_x = 2 + hw[0] / h, 2 + hw[1] / w  # two frame pixels and one slice pixel
    assert abs(ys.mean() - bys.mean()) < tol_y and abs(xs.mean() - bxs.mean()) < tol_x
    _, box = reference_inputs(mask.astype(np.float32), mask, CFG, extent)
    bx0, by0, bx1, by1 = (box * SIZE).tolist()
    assert abs(bx0 - xs.min()) <= tol_x and abs(bx1 - (xs.max() + 1)) <= tol_x
    assert abs(by0 - ys.min()) <= tol_y and abs(by1 - (ys.max() + 1)) <= tol_y
    vis = vision_pixels(mask.astype(np.float32), CFG, extent)[0]
    vys, vxs = np.nonzero((vis > (vis.max() + vis.min()) / 2).numpy())
    vsize = CFG.vision.image_size
    resolved = min(np.ptp(ys), np.ptp(xs)) + 1 >= 4 * SIZE / vsize  # at least 4 vision pixels each way
    if len(vys) and resolved:  # a sliver a pixel or two wide in the vision frame thresholds anywhere
        assert abs(vys.mean() / vsize - ys.mean() / SIZE) < 0.03 and abs(vxs.mean() / vsize - xs.mean() / SIZE) < 0.03
    logits = (torch.as_tensor(target, dtype=torch.float32)[None, None] * 2 - 1) * 10
    back = (logits_to_slice(logits, hw, SIZE, (h, w))[0] > 0).numpy()
    assert back.shape == (h, w)
    if min(hw) >= 24 and mask.sum() * (hw[0] * hw[1]) / (h * w) >= 64:  # well resolved in the frame
        assert (back == mask).mean() > 0.9


def test_the_engine_encodes_a_slice_again_when_its_spacing_changes(tiny_engine):
    """Same pixels, other spacing: another extent in the frame, so the engine's slice cache must not reuse the
    encoding (it is keyed by everything that changes the encoding)."""
    from MediRoundCore.session import Session

    pixels = (generate_slice("abdomen", seed=5).image).astype(np.float32)
    session = Session("spacing-test")
    first = tiny_engine.prepare(session, _slice(pixels, (1.484, 1.484)))
    again = tiny_engine.prepare(session, _slice(pixels, (1.484, 1.484)))
    other = tiny_engine.prepare(session, _slice(pixels, (0.7, 0.7)))
    assert "segmenter_encoder_ms" in first and "segmenter_encoder_ms" not in again
    assert "segmenter_encoder_ms" in other
    state = tiny_engine._asked_state(session, _slice(pixels, (0.7, 0.7)))
    assert state.input_hw == frame_hw(pixels.shape, SIZE, (256 * 0.7 / 380, 256 * 0.7 / 380)) == (121, 121)


def test_training_slices_are_framed_as_the_engine_frames_them():
    """A whole training slice fills the frame with its aspect kept (a non-square one from a dataset folder too); a
    crop of it keeps the scale of its parent; a model without a field fills the frame with the crop."""
    from MediRoundCore.data.dataset import Sample
    from MediRoundCore.data.field_of_view import crop_sample
    from MediRoundCore.train.batching import sample_extent

    image = np.zeros((300, 400), np.float32)
    masks = np.zeros((1, 300, 400), bool)
    masks[0, 140:160, 190:210] = True
    whole = Sample(image=image, queries=["q"], answers=["a [SEG]"], masks=masks, ref_indices=[None], entities=["a"])
    assert sample_extent(whole, CFG) is None and segmenter_pixels(image, CFG)[1] == (192, 256)
    crop = crop_sample(np.random.default_rng(0), whole)
    rows, cols = crop.image.shape
    assert sample_extent(crop, CFG) == pytest.approx((0.75 * rows / 300, cols / 400))
    assert segmenter_pixels(crop.image, CFG, sample_extent(crop, CFG))[1] == (round(rows * 0.64), round(cols * 0.64))
    assert sample_extent(crop, full_config()) is None
