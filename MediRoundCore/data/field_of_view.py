"""Field-of-view crops of training dialogues: real scans come cropped, off-centre and non-square.

The generator draws every slice as a full, centred, square field of view; a model trained only on that fails
when a scan's field of view cuts into the body (issue 26: a 160 × 256 crop of the demo volume, every target
inside, took the last round from Dice 0.98 to 0.00). `crop_sample` cuts a random rectangle out of a sample's
slice: each side an independent share of the slice (so most crops are non-square), placed at random, always
keeping every mask of the dialogue whole with a margin, and so often cutting the body outline. The crop records
its share of the slice's field of view (`meta["frame_extent"]`): a model with a physical field of view
(`MediRoundConfig.field_of_view_mm`) sees it at the training scale, padded, as it sees a real scan's slice of
that extent; one without fills its frame with it. It also records where its centre lies in the field
(`meta["frame_shift"]`): such a model sees it where it lay in the whole slice (`model/field_placement.py`), as it
sees a cropped scan at its place in patient coordinates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FieldOfView:
    """Ranges of the crop (uniform draws)."""

    side: tuple[float, float] = (0.5, 1.0)  # each side's share of the slice's side
    margin_px: int = 4  # kept around the union of the dialogue's masks


def crop_box(rng: np.random.Generator, shape: tuple[int, int], masks: np.ndarray,
             cfg: FieldOfView = FieldOfView()) -> tuple[int, int, int, int]:
    """(row0, col0, rows, cols) of a crop of a (H, W) slice that holds every mask of `masks` (R, H, W)."""
    h, w = shape
    present = np.asarray(masks, bool).reshape(-1, h, w).any(0)
    if present.any():
        rows, cols = np.nonzero(present.any(1))[0], np.nonzero(present.any(0))[0]
        need = (max(0, rows[0] - cfg.margin_px), min(h, rows[-1] + 1 + cfg.margin_px),
                max(0, cols[0] - cfg.margin_px), min(w, cols[-1] + 1 + cfg.margin_px))
    else:
        need = (h // 2, h // 2 + 1, w // 2, w // 2 + 1)
    out = []
    for size, lo, hi in ((h, need[0], need[1]), (w, need[2], need[3])):
        extent = max(hi - lo, int(round(size * rng.uniform(*cfg.side))))
        start = int(rng.integers(max(0, hi - extent), min(lo, size - extent) + 1))
        out += [start, extent]
    return out[0], out[2], out[1], out[3]


def crop_sample(rng: np.random.Generator, sample, cfg: FieldOfView = FieldOfView()):
    """A copy of a training `Sample` whose image and masks are one random crop of its slice."""
    r0, c0, rows, cols = crop_box(rng, sample.image.shape[:2], sample.masks, cfg)
    out = copy.copy(sample)
    out.image = np.ascontiguousarray(sample.image[r0:r0 + rows, c0:c0 + cols])
    out.masks = np.ascontiguousarray(np.asarray(sample.masks)[:, r0:r0 + rows, c0:c0 + cols])
    extent = crop_extent(sample.image.shape[:2], (rows, cols), (sample.meta or {}).get("frame_extent"))
    shift = crop_shift(sample.image.shape[:2], (r0, c0, rows, cols), (sample.meta or {}).get("frame_extent"),
                       (sample.meta or {}).get("frame_shift"))
    out.meta = {**(sample.meta or {}), "field_of_view": (r0, c0, rows, cols), "frame_extent": extent,
                "frame_shift": shift}
    return out


def crop_extent(slice_hw, crop_hw, extent=None) -> tuple[float, float]:
    """A crop's share of the model's field of view: the slice's share (`extent`; a whole slice fills the frame)
    scaled by the crop's share of the slice's rows and columns."""
    from ..model.processing import frame_shares

    h, w = slice_hw
    extent = extent or frame_shares((h, w))
    return extent[0] * crop_hw[0] / h, extent[1] * crop_hw[1] / w


def crop_shift(slice_hw, box, extent=None, shift=None) -> tuple[float, float]:
    """A crop's centre, down and right of the field's centre, in shares of the field (`SliceImage.frame_shift`):
    the slice's own (`shift`; a generated training slice is taken as centred on the patient origin) plus the
    crop centre's offset from the slice centre (`box` (row0, col0, rows, cols) in slice pixels)."""
    from ..model.processing import frame_shares

    h, w = slice_hw
    r0, c0, rows, cols = box
    extent = extent or frame_shares((h, w))
    base = shift or (0.0, 0.0)
    return (float(base[0]) + (r0 + rows / 2 - h / 2) * extent[0] / h,
            float(base[1]) + (c0 + cols / 2 - w / 2) * extent[1] / w)


def with_crops(stream, share: float, seed: int, cfg: FieldOfView = FieldOfView()):
    """The samples of `stream`, a share `share` of them cropped (deterministic given `seed`)."""
    rng = np.random.default_rng([seed, 37])
    for sample in stream:
        yield crop_sample(rng, sample, cfg) if share > 0 and rng.uniform() < share else sample
