"""Imperfect reference masks for training: at test time a round refers to a *predicted* mask, not the truth.

Teacher forcing feeds ground-truth reference masks, so errors of earlier rounds are never seen in training and
compound at test time (the paper's protocol feeds predictions forward). `perturb_reference` turns a true mask
into one that looks like a prediction of it: grown or shrunk at the border, shifted, or with a part cut away.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("grow", "shrink", "shift", "cut")


def _morph(mask: np.ndarray, radius: int, grow: bool) -> np.ndarray:
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = 2 * radius + 1
    out = F.max_pool2d(x if grow else 1 - x, k, stride=1, padding=radius)
    return (out if grow else 1 - out)[0, 0].numpy() > 0.5


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros_like(mask)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                     max(-dx, 0):w - max(dx, 0)]
    return out


def _cut(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0, np.pi)
    proj = ys * np.sin(angle) + xs * np.cos(angle)
    keep = proj <= np.quantile(proj, rng.uniform(0.6, 0.9))
    out = np.zeros_like(mask)
    out[ys[keep], xs[keep]] = True
    return out


def perturb_reference(mask: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """A copy of the boolean `mask` with one prediction-like error; never empty when `mask` is not."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    extent = max(1, int(round(np.sqrt(mask.sum()) * 0.15)))
    if kind == "grow":
        out = _morph(mask, int(rng.integers(1, extent + 1)), grow=True)
    elif kind == "shrink":
        out = _morph(mask, int(rng.integers(1, extent + 1)), grow=False)
    elif kind == "shift":
        dy, dx = (int(v) for v in rng.integers(-extent, extent + 1, size=2))
        out = _shift(mask, dy, dx)
    elif kind == "cut":
        out = _cut(mask, rng)
    else:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {KINDS}")
    return out if out.any() else mask.copy()
