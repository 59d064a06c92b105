"""A mask that answers "the larger/smaller lesion" holds one lesion.

The mask decoder, asked for one lesion of a pair ("the smaller nodule in the left lung"), often outlines both
(design notes, "One lesion for a size word"). When the round's answer names a lesion by its size and the mask
holds two or more separate blobs of some size, the mask keeps the one the word asks for: the largest for
"larger", the smallest for "smaller". Size is the blob's area on the slice, as the training names were given.
Anything else is returned as it is.
"""

from __future__ import annotations

import numpy as np

from .lesion_finder import LARGER_WORDS, SMALLER_WORDS, _words, names_a_lesion

# a blob counts as a lesion of its own when it has at least this many pixels and this share of the largest blob:
# specks beside a lesion leave the mask as it is (so does a lesion cut in two, only if one part is the smaller
# by far: two even halves read as two lesions)
MIN_PIXELS = 6
MIN_SHARE = 0.2


def size_asked(entity: str | None) -> str | None:
    """"larger", "smaller" or None: how an answer's entity ("smaller cyst in the left kidney") picks its lesion."""
    if not names_a_lesion(entity):
        return None
    words = set(_words(entity))
    larger, smaller = bool(words & LARGER_WORDS), bool(words & SMALLER_WORDS)
    return "larger" if larger and not smaller else "smaller" if smaller and not larger else None


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected blobs of a 2-D mask (nonzero pixels): the label image (0 background) and each label's pixel
    count (index 0: the background)."""
    import SimpleITK as sitk

    labelling = sitk.ConnectedComponentImageFilter()
    labelling.SetFullyConnected(True)  # pixels touching at a corner are one blob
    labels = sitk.GetArrayFromImage(labelling.Execute(sitk.GetImageFromArray(np.asarray(mask, bool).astype(np.uint8))))
    return labels, np.bincount(labels.ravel())


def lesion_sized_blobs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`components(mask)` and the labels of the blobs that count as lesions of their own (MIN_PIXELS, MIN_SHARE)."""
    labels, counts = components(mask)
    sizes = counts[1:]
    if not len(sizes):
        return labels, counts, np.zeros(0, int)
    return labels, counts, np.flatnonzero((sizes >= MIN_PIXELS) & (sizes >= MIN_SHARE * sizes.max())) + 1


def keep_lesion_by_size(mask: np.ndarray, entity: str | None) -> np.ndarray:
    """The 2-D mask with only the blob the entity's size word asks for (a new bool array), when it holds two or
    more lesion-sized blobs; otherwise `mask` itself (3-D masks too)."""
    which = size_asked(entity)
    if which is None or np.ndim(mask) != 2 or not np.any(mask):
        return mask
    labels, counts, lesions = lesion_sized_blobs(mask)
    if len(lesions) < 2:
        return mask
    pick = max(lesions, key=lambda k: counts[k]) if which == "larger" else min(lesions, key=lambda k: counts[k])
    return labels == pick
