"""Multi-round evaluation: metrics (Dice, gIoU, cIoU), the paper's protocol with ablations, QUALITY.md."""

from .metrics import MaskCounts, Scores, dice, iou, mask_counts, per_round, summarize

__all__ = ["MaskCounts", "Scores", "dice", "iou", "mask_counts", "per_round", "summarize"]
