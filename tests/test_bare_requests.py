"""Requests naming no structure ("Segment the lesion.") in lite's training dialogues: the target is what the
slice shows (its only lesion, the clearly largest for "the largest …", none: absent), and the inserted round
keeps every other round's reference pointing at the same structure."""

import dataclasses

import numpy as np

from MediRoundCore.answers import parse_entity
from MediRoundCore.data import bare_requests
from MediRoundCore.data.absent import is_absent_answer
from MediRoundCore.train.lite_data import PoolConfig, pool_sample, pool_view

ORGAN_WORDS = ("left", "right", "kidney", "liver", "lung", "spleen", "hemisphere", "brain")


def _slice_with(lesion_areas):
    """A pool slice whose lesion-kind structures keep only the first len(lesion_areas) lesions, cut to those
    pixel counts (others emptied)."""
    for index in range(40):
        sl, _, _, _ = pool_view("train", 0, index, 0)
        lesions = bare_requests.shown_lesions(sl)
        if len(lesions) >= len(lesion_areas) and all(int(l.mask.sum()) >= a for l, a in zip(lesions, lesion_areas)):
            break
    keep = {l.name: a for l, a in zip(lesions, lesion_areas)}
    instances = []
    for inst in sl.instances:
        if inst.kind == "lesion":
            mask = np.zeros_like(inst.mask)
            if inst.name in keep:
                ys, xs = np.nonzero(inst.mask)
                mask[ys[:keep[inst.name]], xs[:keep[inst.name]]] = True
            inst = dataclasses.replace(inst, mask=mask, area=int(mask.sum()))
        instances.append(inst)
    return dataclasses.replace(sl, instances=instances)


def test_one_lesion_is_the_target_and_the_query_names_no_organ():
    sl = _slice_with([30])
    (lesion,) = bare_requests.shown_lesions(sl)
    for seed in range(12):
        query, answer, entity, mask = bare_requests.bare_request(sl, np.random.default_rng(seed))
        assert entity == lesion.name and parse_entity(answer) == lesion.name and "[SEG]" in answer
        assert np.array_equal(mask, lesion.mask)
        assert not any(w in query.lower().split() or w + "." in query.lower() for w in ORGAN_WORDS), query


def test_several_lesions_need_a_clearly_largest_one():
    clear = _slice_with([40, 20])
    largest = bare_requests.shown_lesions(clear)[0]
    query, answer, entity, _ = bare_requests.bare_request(clear, np.random.default_rng(0))
    assert entity == largest.name and ("largest" in query or "biggest" in query)
    assert bare_requests.bare_request(_slice_with([30, 28]), np.random.default_rng(0)) is None


def test_no_lesion_shown_is_answered_absent():
    sl = _slice_with([])
    query, answer, entity, mask = bare_requests.bare_request(sl, np.random.default_rng(1))
    assert is_absent_answer(answer) and not mask.any() and entity in query.lower()


def test_inserted_round_keeps_references_and_pool_dialogues_carry_them():
    cfg = PoolConfig(slices=40, views=2, bare=1.0, product_references=0.0)  # the rest of the stream unchanged
    seen = 0
    for entry in range(40):
        plain = pool_sample(dataclasses.replace(cfg, bare=0.0), entry, 3)
        sample = pool_sample(cfg, entry, 3)
        if plain is None or sample is None or sample.num_rounds == plain.num_rounds:
            continue
        seen += 1
        assert sample.num_rounds == plain.num_rounds + 1
        new = next(k for k in range(sample.num_rounds)
                   if k >= plain.num_rounds or sample.queries[k] != plain.queries[k])
        for k in range(plain.num_rounds):  # every original round refers to the same structure as before
            after = k + (k >= new)
            ref, ref_after = plain.ref_indices[k], sample.ref_indices[after]
            assert (ref is None) == (ref_after is None)
            if ref is not None:
                assert sample.entities[ref_after] == plain.entities[ref]
    assert seen >= 10
