"""Absent-target rounds: only structures the slice does not show are asked for, answered as absent with no
segment and an empty mask; the dialogue's other rounds and references are unchanged."""

import numpy as np
import pytest

from MediRoundCore.answers import parse_entity
from MediRoundCore.data.absent import (CATALOGUE, absent_candidates, is_absent_answer, with_absent_rounds)
from MediRoundCore.data.anatomy import generate_slice
from MediRoundCore.data.splits import make_dialogue, to_sample


@pytest.mark.parametrize("region", sorted(CATALOGUE))
def test_catalogue_covers_what_the_generator_draws(region):
    drawn = set()
    for seed in range(6):
        sl = generate_slice(region, seed, modality="CT", paired=True)
        drawn |= {i.name for i in sl.instances if i.kind in ("organ", "part") and "tumour" not in i.name}
        for name in absent_candidates(sl):
            assert name not in {i.name for i in sl.instances}
            assert all(i.noun != name for i in sl.instances)
    assert drawn <= set(CATALOGUE[region])


def test_a_chest_slice_is_asked_for_abdominal_organs_not_its_own():
    sl = generate_slice("chest", 3, modality="CT")
    candidates = absent_candidates(sl)
    assert "liver" in candidates and "left kidney" in candidates
    assert not {"heart", "left lung", "aorta", "descending aorta"} & set(candidates)


def test_inserted_rounds_keep_the_dialogue():
    dlg = make_dialogue("train", 0, 7)
    sample = to_sample(dlg)
    out = with_absent_rounds(sample, dlg.slice, np.random.default_rng(0), p=1.0)
    flags = out.meta["absent"]
    assert sum(flags) == sample.num_rounds - 1 and out.num_rounds == 2 * sample.num_rounds - 1
    kept = [k for k, f in enumerate(flags) if not f]
    assert [out.queries[k] for k in kept] == sample.queries
    for k_new, k_old in zip(kept, range(sample.num_rounds)):
        assert np.array_equal(out.masks[k_new], sample.masks[k_old])
        ref = out.ref_indices[k_new]
        old = sample.ref_indices[k_old]
        assert (ref is None) == (old is None)
        if ref is not None:
            assert np.array_equal(out.masks[ref], sample.masks[old])
    for k in (k for k, f in enumerate(flags) if f):
        assert not out.masks[k].any() and out.ref_indices[k] is None
        assert is_absent_answer(out.answers[k]) and parse_entity(out.answers[k]) == out.entities[k]
        assert out.entities[k] not in {i.name for i in dlg.slice.instances}
