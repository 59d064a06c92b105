"""Segmentation metrics of the paper (section 5): Dice, gIoU and cIoU, overall and per round.

Definitions, for binary masks P (predicted) and G (ground truth):
- Dice of one mask: 2|P∩G| / (|P|+|G|).  Reported Dice = mean over masks.
- IoU of one mask:  |P∩G| / |P∪G|.        gIoU = mean over masks of the per-mask IoU.
- cIoU = Σ|P∩G| / Σ|P∪G| over all masks (cumulative: large structures weigh more).
All reported as percentages (× 100).

Empty-vs-empty conventions (what medpy.metric.binary.dc / jc intend in their ZeroDivisionError branch, though
with numpy counts they return NaN; and what the public LISA-style gIoU code does):
- a mask whose prediction and ground truth are both empty scores Dice 1 and IoU 1 (perfect agreement);
- it adds nothing to the cIoU sums (0 intersection, 0 union); cIoU of a set whose total union is 0 is 1;
- an empty prediction for a non-empty ground truth (or the reverse) scores 0.
A mean over no masks at all is NaN (shown as "n/a" in reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class MaskCounts:
    """Pixel counts of one predicted mask against its ground truth."""

    intersection: int
    union: int
    pred_area: int
    gt_area: int

    @property
    def dice(self) -> float:
        total = self.pred_area + self.gt_area
        return 1.0 if total == 0 else 2.0 * self.intersection / total

    @property
    def iou(self) -> float:
        return 1.0 if self.union == 0 else self.intersection / self.union


def mask_counts(pred: np.ndarray, gt: np.ndarray) -> MaskCounts:
    """Counts of two same-shape masks (anything nonzero is foreground)."""
    p = np.asarray(pred).astype(bool)
    g = np.asarray(gt).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"predicted mask {p.shape} and ground truth {g.shape} differ in shape")
    inter = int(np.count_nonzero(p & g))
    pa, ga = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    return MaskCounts(inter, pa + ga - inter, pa, ga)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient in [0, 1] (1 for two empty masks)."""
    return mask_counts(pred, gt).dice


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union in [0, 1] (1 for two empty masks)."""
    return mask_counts(pred, gt).iou


@dataclass(frozen=True)
class Scores:
    """Dice, gIoU and cIoU in percent over `n` masks (NaN when n == 0)."""

    n: int
    dice: float
    giou: float
    ciou: float

    def as_dict(self) -> dict:
        return {"n": self.n, "dice": self.dice, "giou": self.giou, "ciou": self.ciou}


def summarize(counts: Iterable[MaskCounts]) -> Scores:
    """Dice (mean), gIoU (mean per-mask IoU) and cIoU (Σ intersection / Σ union), in percent."""
    items = list(counts)
    if not items:
        return Scores(0, math.nan, math.nan, math.nan)
    inter = sum(c.intersection for c in items)
    union = sum(c.union for c in items)
    return Scores(len(items),
                  100.0 * float(np.mean([c.dice for c in items])),
                  100.0 * float(np.mean([c.iou for c in items])),
                  100.0 * (1.0 if union == 0 else inter / union))


def per_round(records: Iterable, key=lambda r: r.round) -> dict[int, Scores]:
    """Scores per round number of records that carry `.counts` (and `.round`, or what `key` gives)."""
    groups: dict[int, list[MaskCounts]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r.counts)
    return {k: summarize(v) for k, v in sorted(groups.items())}
