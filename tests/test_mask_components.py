"""One lesion for a size word (MediRoundCore/mask_components.py): blobs found by SimpleITK, the one asked kept."""

import numpy as np
import pytest

from MediRoundCore.mask_components import components, keep_lesion_by_size, size_asked


def two_nodules():
    mask = np.zeros((48, 48), bool)
    mask[4:9, 4:9] = True  # 25 px
    mask[20:30, 20:30] = True  # 100 px
    mask[44, 44] = True  # a speck
    return mask


@pytest.mark.parametrize("entity, expected", [
    ("smaller nodule in the left lung", "smaller"), ("larger cyst in the right kidney", "larger"),
    ("Biggest lesion in the liver", "larger"), ("nodule in the left lung", None), ("larger kidney", None),
    ("left kidney", None), (None, None), ("larger or smaller nodule", None)])
def test_size_asked_reads_the_answer_entity(entity, expected):
    assert size_asked(entity) == expected


def test_the_word_picks_its_blob_and_drops_the_rest():
    mask = two_nodules()
    smaller = keep_lesion_by_size(mask, "smaller nodule in the left lung")
    larger = keep_lesion_by_size(mask, "larger nodule in the left lung")
    assert smaller.sum() == 25 and smaller[4:9, 4:9].all()
    assert larger.sum() == 100 and larger[20:30, 20:30].all()


def test_masks_without_a_size_word_or_a_second_lesion_are_kept_whole():
    mask = two_nodules()
    assert keep_lesion_by_size(mask, "nodule in the left lung") is mask
    one = mask.copy()
    one[4:9, 4:9] = False  # one lesion and a speck: the speck is under MIN_PIXELS, nothing to choose
    assert keep_lesion_by_size(one, "smaller nodule in the left lung") is one
    small_share = np.zeros((64, 64), bool)
    small_share[0:40, 0:40] = True  # 1600 px
    small_share[50:54, 50:60] = True  # 40 px: under a fifth of the largest, a fragment rather than a lesion
    assert keep_lesion_by_size(small_share, "smaller nodule in the left lung") is small_share
    assert not keep_lesion_by_size(np.zeros((8, 8), bool), "smaller nodule").any()
    stack = np.stack([mask, mask])  # not a slice's mask: left alone
    assert keep_lesion_by_size(stack, "smaller nodule in the left lung") is stack


def test_a_mask_of_numbers_is_read_by_its_nonzero_pixels():
    mask = two_nodules().astype(np.uint16) * 256  # 256 would wrap to 0 as uint8
    kept = keep_lesion_by_size(mask, "larger nodule in the left lung")
    assert kept.dtype == bool and kept.sum() == 100
    assert keep_lesion_by_size(two_nodules() * 0.7, "smaller nodule in the left lung").sum() == 25


def test_smaller_picks_the_smallest_lesion_sized_blob_of_three():
    mask = two_nodules()
    mask[36:40, 4:10] = True  # 24 px: over MIN_PIXELS and a fifth of the largest, a third lesion-sized blob
    assert keep_lesion_by_size(mask, "smaller nodule in the left lung").sum() == 24
    assert keep_lesion_by_size(mask, "larger nodule in the left lung").sum() == 100


def test_blobs_touching_at_a_corner_are_one():
    mask = np.zeros((20, 20), bool)
    mask[2:8, 2:8] = True
    mask[8:14, 8:14] = True  # meets the first at one corner (8-connected)
    labels, counts = components(mask)
    assert labels.max() == 1 and counts[1] == 72
    assert keep_lesion_by_size(mask, "smaller nodule") is mask
