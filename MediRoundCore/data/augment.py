"""Domain randomisation of generated training slices: what real scans vary in and the generator holds fixed.

From the raw slice (HU for CT) and its masks: the display window (CT: level and width jittered around the
region's training window; MR: percentile bounds and a gamma), resolution (down- then up-sampling), blur,
noise, and field of view (a random part of the slice that keeps every target mostly inside, masks following
exactly: magnified back to the slice's size, or with `keep_scale` cut out at its own size, as a real scan's
smaller field of view is, for a model that sees slices at a physical scale). The intensities per tissue and the shapes are already drawn per slice by the
generator (`generate_slice(contrast=, noise_level=)`, random blobs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .anatomy import CT_WINDOWS
from .shapes import gaussian_blur


@dataclass(frozen=True)
class Randomization:
    """Ranges of each randomisation (uniform draws); zero widths turn one off."""

    window_level_shift: float = 0.15  # × width
    window_width_scale: tuple[float, float] = (0.75, 1.35)
    mr_low_pct: tuple[float, float] = (0.0, 3.0)
    mr_high_pct: tuple[float, float] = (97.0, 100.0)
    gamma: tuple[float, float] = (0.75, 1.35)
    resolution: tuple[float, float] = (1.0, 2.5)  # down-sampling factor before up-sampling back
    blur_px: tuple[float, float] = (0.0, 1.2)
    noise: tuple[float, float] = (0.0, 0.04)  # sd in display units
    zoom: tuple[float, float] = (1.0, 1.35)  # > 1 crops the field of view
    keep_scale: bool = False  # the crop keeps its pixels' size (the image shrinks) instead of filling the slice
    keep_fraction: float = 0.8  # a zoom must keep this share of every target's area, else no zoom


def display_window(rng: np.random.Generator, image: np.ndarray, modality: str, region: str,
                   cfg: Randomization) -> np.ndarray:
    """Raw slice → [0,1] through a randomised window around the one training uses for the region."""
    if modality == "CT":
        level, width = CT_WINDOWS[region]
        width = width * rng.uniform(*cfg.window_width_scale)
        level = level + rng.uniform(-cfg.window_level_shift, cfg.window_level_shift) * width
        lo, hi = level - width / 2, level + width / 2
        out = np.clip((image - lo) / (hi - lo), 0, 1)
    else:
        lo, hi = np.percentile(image, [rng.uniform(*cfg.mr_low_pct), rng.uniform(*cfg.mr_high_pct)])
        out = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    return (out ** rng.uniform(*cfg.gamma)).astype(np.float32)


def _zoom_box(rng, shape, masks, cfg) -> tuple[int, int, int, int] | None:
    h, w = shape
    for _ in range(10):
        z = rng.uniform(*cfg.zoom)
        ch, cw = int(round(h / z)), int(round(w / z))
        if ch >= h and cw >= w:
            return None
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        inside = masks[:, y0:y0 + ch, x0:x0 + cw].reshape(len(masks), -1).sum(1)
        total = masks.reshape(len(masks), -1).sum(1)
        if np.all(inside >= cfg.keep_fraction * total):
            return y0, x0, ch, cw
    return None


def _resize(x: np.ndarray, shape, mode: str) -> np.ndarray:
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    t = t[None, None] if t.ndim == 2 else t[:, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(t, size=tuple(shape), mode=mode, **kwargs)
    return out[0, 0].numpy() if x.ndim == 2 else out[:, 0].numpy()


def randomize(rng: np.random.Generator, image: np.ndarray, masks: np.ndarray, modality: str, region: str,
              cfg: Randomization = Randomization()) -> tuple[np.ndarray, np.ndarray]:
    """(display image in [0,1] float32, masks (R,·,·) bool) of one randomised view of a raw slice: the slice's
    shape, or with `cfg.keep_scale` the field-of-view crop's (its share of the slice is the shape ratio)."""
    return randomized_view(rng, image, masks, modality, region, cfg)[:2]


def randomized_view(rng: np.random.Generator, image: np.ndarray, masks: np.ndarray, modality: str, region: str,
                    cfg: Randomization = Randomization()):
    """`randomize`, and the field-of-view crop's box (row0, col0, rows, cols) in the slice, or None."""
    masks = np.asarray(masks, bool)
    shape = image.shape
    out = display_window(rng, np.asarray(image, np.float64), modality, region, cfg)
    box = _zoom_box(rng, shape, masks, cfg)
    if box is not None:
        y0, x0, ch, cw = box
        out, masks = out[y0:y0 + ch, x0:x0 + cw], masks[:, y0:y0 + ch, x0:x0 + cw]
        if cfg.keep_scale:
            shape = out.shape
        else:
            out = _resize(out, shape, "bilinear")
            masks = _resize(masks.astype(np.float32), shape, "nearest") > 0.5
    factor = rng.uniform(*cfg.resolution)
    if factor > 1.05:
        small = (max(8, int(shape[0] / factor)), max(8, int(shape[1] / factor)))
        out = _resize(_resize(out, small, "bilinear"), shape, "bilinear")
    sigma = rng.uniform(*cfg.blur_px)
    if sigma > 0.2:
        out = gaussian_blur(out, sigma)
    sd = rng.uniform(*cfg.noise)
    if sd > 0:
        out = out + rng.normal(0, sd, shape)
    return np.clip(out, 0, 1).astype(np.float32), masks, box


def randomize_sample(rng: np.random.Generator, dlg, sample, cfg: Randomization = Randomization()):
    """A copy of a generated dialogue's Sample whose image and masks are one randomised view of its slice."""
    import copy

    out = copy.copy(sample)
    out.image, out.masks = randomize(rng, dlg.slice.image, sample.masks, dlg.slice.modality, dlg.slice.region, cfg)
    return out
