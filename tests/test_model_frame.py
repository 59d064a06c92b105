"""Where a slice lies in the model's square frame, for every consumer alike: the segmenter's pixels, the vision
tower's pixels, the training targets, the reference box and the mask coming back. Non-square slices (tall and
wide) are the cases where a swapped height/width or a corner-anchored padding puts masks in the wrong place."""

import numpy as np
import pytest
import torch

from MediRoundCore.model import tiny_config
from MediRoundCore.model.processing import (frame_box, logits_to_slice, masks_to_segmenter_frame, pad_offsets,
                                            reference_inputs, segmenter_pixels, vision_pixels)

SHAPES = [(64, 64), (48, 128), (128, 40), (256, 176), (176, 256), (160, 256), (31, 97)]


def _blob(shape, seed=0):
    """A rectangle off-centre, so a transposed, flipped or shifted frame cannot return it unchanged."""
    h, w = shape
    rng = np.random.default_rng(seed)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    mask = np.zeros(shape, bool)
    mask[y0:y0 + max(2, h // 4), x0:x0 + max(3, w // 3)] = True
    return mask


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_through_the_frame_and_back_lands_where_it_was(shape):
    """A slice mask put into the segmenter frame (training targets) and read back as logits (inference)
    returns the same pixels: the padding is removed where it was added, height as height."""
    size = 256
    mask = _blob(shape)
    scale = size / max(shape)
    hw = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
    framed = masks_to_segmenter_frame(mask[None], hw, size)
    logits = (framed[:, None] * 2 - 1) * 10  # (1,1,S,S) as the decoder's output at full frame resolution
    back = (logits_to_slice(logits, hw, size, shape)[0] > 0).numpy()
    assert back.shape == shape
    agreement = (back == mask).mean()
    assert agreement > 0.97, agreement
    assert (back & mask).sum() / mask.sum() > 0.9


@pytest.mark.parametrize("shape", SHAPES)
def test_pixels_targets_and_box_share_one_placement(shape):
    """The bright rectangle of a slice appears in the segmenter pixels, the vision pixels and the training
    target at the same frame position, and the reference box says that position."""
    cfg = tiny_config()
    mask = _blob(shape, seed=1)
    slice01 = mask.astype(np.float32)
    seg, hw = segmenter_pixels(slice01, cfg)
    size = cfg.segmenter.image_size
    assert seg.shape == (3, size, size)
    bright = (seg[0] > seg[0].min() + 1e-3).numpy()  # padding is black, like the slice's own background
    target = masks_to_segmenter_frame(mask[None], hw, size)[0].numpy() > 0
    ys, xs = np.nonzero(target)
    bys, bxs = np.nonzero(bright)
    assert abs(ys.mean() - bys.mean()) < 1.5 and abs(xs.mean() - bxs.mean()) < 1.5
    _, box = reference_inputs(slice01, mask, cfg)
    x0, y0, x1, y1 = (box * size).tolist()
    assert abs(x0 - xs.min()) <= 2 and abs(x1 - (xs.max() + 1)) <= 2
    assert abs(y0 - ys.min()) <= 2 and abs(y1 - (ys.max() + 1)) <= 2
    vis = vision_pixels(slice01, cfg)[0]
    vsize = cfg.vision.image_size
    vys, vxs = np.nonzero((vis > vis.min() + 1e-3).numpy())
    assert abs(vys.mean() / vsize - ys.mean() / size) < 0.03 and abs(vxs.mean() / vsize - xs.mean() / size) < 0.03


@pytest.mark.parametrize("normalization", ["minmax", "sam_mean_std"])  # the tiny model's and MedSAM's
def test_padding_is_black_and_centred(normalization):
    """A wide slice of uniform grey: the rows above and below it in the frame hold the value of black (0 in
    [0,1]), not the normalisation's zero (the channel mean); the slice is centred."""
    cfg = tiny_config()
    cfg.segmenter_normalization = normalization
    seg, hw = segmenter_pixels(np.full((64, 256), 0.5, np.float32), cfg)
    black, _ = segmenter_pixels(np.zeros((256, 256), np.float32), cfg)
    assert hw == (64, 256) and pad_offsets(hw, 256) == (96, 0)
    assert torch.allclose(seg[:, :96], black[:, :96]) and torch.allclose(seg[:, 160:], black[:, 160:])
    assert not torch.allclose(seg[:, 96:160], black[:, 96:160])
    vis = vision_pixels(np.full((64, 256), 0.5, np.float32), cfg)
    vblack = vision_pixels(np.zeros((8, 8), np.float32), cfg)
    assert torch.allclose(vis[:, :48], vblack[:, :48]) and torch.allclose(vis[:, 80:], vblack[:, 80:])


def test_frame_box_of_square_slice_is_the_papers_box():
    assert frame_box((10, 20, 30, 40), (100, 100)) == [0.1, 0.2, 0.3, 0.4]
    assert frame_box((0, 0, 50, 100), (100, 50)) == [0.25, 0.0, 0.75, 1.0]  # tall: centred horizontally


def test_reference_crop_shows_only_the_referenced_mask():
    """DESIGN: the referenced round's mask crops the image *masked*, cropped to its box, padded square. A
    uniformly bright slice under a triangular mask gives the crop of the triangle itself, not of its box."""
    cfg = tiny_config()
    h, w = 60, 90
    yy, xx = np.mgrid[:h, :w]
    triangle = (xx >= 20) & (xx < 60) & (yy >= 10) & (yy < 50) & (xx - 20 >= yy - 10)
    bright = np.ones((h, w), np.float32)
    crop, box = reference_inputs(bright, triangle, cfg)
    as_drawn, _ = reference_inputs(triangle.astype(np.float32), triangle, cfg)
    assert torch.allclose(crop, as_drawn, atol=1e-6)
    box_only, _ = reference_inputs(bright, (xx >= 20) & (xx < 60) & (yy >= 10) & (yy < 50), cfg)
    assert (crop - box_only).abs().max() > 1.0  # half the box is black in the crop
