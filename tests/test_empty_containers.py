"""Lesion queries on an organ without a lesion (data/empty_containers.py): answered absent with no segment,
followed by the real round; the rest of the dialogue and what every reference points at are kept."""

import copy

import numpy as np
import pytest

from MediRoundCore.answers import parse_entity
from MediRoundCore.data.absent import is_absent_answer
from MediRoundCore.data.empty_containers import empty_hosts, lesion_named_in, with_empty_container_rounds
from MediRoundCore.data.splits import make_dialogue, to_sample


def dialogue(index):
    dlg = make_dialogue("train", 0, index)
    return dlg, to_sample(dlg)


def referenced_entities(sample):
    return [(q, e, None if r is None else sample.entities[r])
            for q, e, r in zip(sample.queries, sample.entities, sample.ref_indices)]


def test_empty_hosts_are_lesion_organs_without_a_lesion():
    dlg, _ = dialogue(28)  # a nodule in the left lung only
    assert empty_hosts(dlg.slice) == {"right lung"}
    lesion = dlg.slice.instance("nodule in the left lung")
    assert lesion_named_in(lesion, "right lung") == "nodule in the right lung"
    dlg, _ = dialogue(26)
    tumour = dlg.slice.instance("right hemisphere tumour")
    assert lesion_named_in(tumour, "left hemisphere") == "left hemisphere tumour"


def test_the_same_query_on_the_empty_organ_comes_first_answered_absent():
    dlg, sample = dialogue(28)  # ... right lung, left lung, "Now segment the nodule inside it." (left lung)
    out = with_empty_container_rounds(sample, dlg.slice, np.random.default_rng(0), p=1.0)
    assert out.num_rounds == sample.num_rounds + 1
    k = out.queries.index("Now segment the nodule inside it.")
    assert out.queries[k + 1] == out.queries[k]
    assert is_absent_answer(out.answers[k]) and parse_entity(out.answers[k]) == "nodule in the right lung"
    assert out.entities[out.ref_indices[k]] == "right lung" and not out.masks[k].any()
    assert out.meta["absent"] == [i == k for i in range(out.num_rounds)]
    # the original rounds follow, each still referring to the structure it referred to, with its mask
    kept = [i for i in range(out.num_rounds) if i != k]
    assert [referenced_entities(out)[i] for i in kept] == referenced_entities(sample)
    assert all(np.array_equal(out.masks[i], m) for i, m in zip(kept, sample.masks))


def test_an_empty_organ_not_asked_for_yet_is_asked_for_first():
    dlg, sample = dialogue(36)  # left kidney, "Segment the larger cyst sitting within it."; the spleen is never asked
    out = with_empty_container_rounds(sample, dlg.slice, np.random.default_rng(0), p=1.0)
    k = out.queries.index("Segment the larger cyst sitting within it.")
    assert out.num_rounds == sample.num_rounds + 2
    assert out.entities[k - 1] == "spleen" and np.array_equal(out.masks[k - 1], dlg.slice.instance("spleen").mask)
    assert not is_absent_answer(out.answers[k - 1]) and out.ref_indices[k - 1] == k - 2
    assert out.ref_indices[k] == k - 1 and parse_entity(out.answers[k]) == "cyst in the spleen"
    assert out.entities[out.ref_indices[k + 1]] == "left kidney" and out.masks[k + 1].any()
    # an organ the dialogue asks for later is not asked for first (every target once)
    dlg, sample = dialogue(18)  # spleen, "Next, the lesion in it, please."; the right kidney is asked at the end
    assert empty_hosts(dlg.slice) == {"right kidney"}
    assert with_empty_container_rounds(sample, dlg.slice, np.random.default_rng(0), p=1.0) is sample


def test_a_bare_request_is_not_a_lesion_in_it():
    """"Segment the lesion." asks for the slice's lesion whatever the round before: never answered absent here."""
    dlg, sample = dialogue(28)
    k = sample.queries.index("Now segment the nodule inside it.")
    sample.meta = {**(sample.meta or {}), "bare": [i == k for i in range(sample.num_rounds)]}
    assert with_empty_container_rounds(sample, dlg.slice, np.random.default_rng(0), p=1.0) is sample


def test_a_product_guess_of_an_empty_organ_is_answered_absent_then_retried_on_the_lesions_organ():
    dlg, sample = dialogue(28)
    guessed = copy.copy(sample)
    k = sample.queries.index("Now segment the nodule inside it.")
    guessed.ref_indices = list(sample.ref_indices)
    guessed.ref_indices[k] = sample.entities.index("right lung")  # the resolver's wrong guess
    guessed.meta = {**(sample.meta or {}), "product_references": True, "dataset_references": list(sample.ref_indices)}
    out = with_empty_container_rounds(guessed, dlg.slice, np.random.default_rng(0), p=0.0)
    assert out.queries[k] == out.queries[k + 1] == sample.queries[k]
    assert is_absent_answer(out.answers[k]) and out.entities[out.ref_indices[k]] == "right lung"
    assert out.answers[k + 1] == sample.answers[k] and out.entities[out.ref_indices[k + 1]] == "left lung"
    # a right guess is left as it is
    right = copy.copy(guessed)
    right.ref_indices = list(sample.ref_indices)
    assert with_empty_container_rounds(right, dlg.slice, np.random.default_rng(0), p=0.0) is right


@pytest.mark.parametrize("query", ["Now segment the nodule inside the left lung.", "Now the nodule in round 3.",
                                   "Now the nodule inside the last one."])
def test_a_query_that_names_its_organ_or_round_is_left_alone(query):
    dlg, sample = dialogue(28)
    k = sample.queries.index("Now segment the nodule inside it.")
    sample.queries[k] = query
    assert with_empty_container_rounds(sample, dlg.slice, np.random.default_rng(0), p=1.0) is sample


def test_without_empty_organs_nothing_changes():
    for index in range(40):
        dlg, sample = dialogue(index)
        if not empty_hosts(dlg.slice):
            assert with_empty_container_rounds(sample, dlg.slice, np.random.default_rng(0), p=1.0) is sample
            return
    pytest.fail("no generated slice without an empty lesion organ in 40")
