"""A mask that answers "the larger/smaller lesion" holds one lesion.

The mask decoder, asked for one lesion of a pair ("the smaller nodule in the left lung"), often outlines both
(design notes, "One lesion for a size word"). When the round's answer names a lesion by its size and the mask
holds two or more separate blobs of some size, the mask keeps the one the word asks for: the largest for
"larger", the smallest for "smaller". Anything else is returned as it is.
"""

import re

import numpy as np
import SimpleITK as sitk

from .lesion_finder import names_a_lesion

_LARGER = frozenset("larger bigger largest biggest".split())
_SMALLER = frozenset("smaller smallest tinier tiniest".split())
_WORD = re.compile(r"[a-z]+")

# a blob counts as a lesion of its own when it is at least this share of the largest blob and this many pixels:
# specks beside a lesion, and a lesion cut in two by a thin gap, leave the mask as it is
MIN_SHARE = 0.2
MIN_PIXELS = 6


def size_asked(entity: str | None) -> str | None:
    """"larger", "smaller" or None: how an answer's entity ("smaller cyst in the left kidney") picks its lesion."""
    words = set(_WORD.findall((entity or "").lower()))
    if not names_a_lesion(entity):
        return None
    if words & _LARGER and not words & _SMALLER:
        return "larger"
    if words & _SMALLER and not words & _LARGER:
        return "smaller"
    return None


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected blobs of a 2-D mask: the label image (0 background) and each label's pixel count (index 0 unused)."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return labels, np.bincount(labels.ravel())


def keep_lesion_by_size(mask: np.ndarray, entity: str | None) -> np.ndarray:
    """The mask with only the blob the entity's size word asks for, when it holds two or more lesion-sized blobs."""
    which = size_asked(entity)
    if which is None or mask.ndim != 2 or not mask.any():
        return mask
    labels, counts = components(mask)
    sizes = counts[1:]
    lesions = np.flatnonzero((sizes >= MIN_PIXELS) & (sizes >= MIN_SHARE * sizes.max())) + 1
    if len(lesions) < 2:
        return mask
    pick = max(lesions, key=lambda k: counts[k]) if which == "larger" else min(lesions, key=lambda k: counts[k])
    return labels == pick
