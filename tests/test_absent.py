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


def test_present_direct_requests_contrast_the_absent_ones():
    """With `present`, direct requests for structures on the slice are inserted too (their mask, a segment
    answer), never one the dialogue asks for; with `refer_previous` every inserted round refers to the round
    before it, as the product's resolver makes later rounds do."""
    dlg = make_dialogue("train", 0, 7)
    sample = to_sample(dlg)
    out = with_absent_rounds(sample, dlg.slice, np.random.default_rng(1), p=0.5, present=1.0, refer_previous=True)
    original = set(sample.queries)
    inserted = [k for k, q in enumerate(out.queries) if q not in original]
    present = [k for k in inserted if not out.meta["absent"][k]]
    assert present and len(inserted) > len(present)
    shown = {i.name: i for i in dlg.slice.instances}
    for k in present:
        assert out.entities[k] in shown and out.entities[k] not in sample.entities
        assert np.array_equal(out.masks[k], shown[out.entities[k]].mask)
        assert parse_entity(out.answers[k]) == out.entities[k] and out.answers[k].endswith("[SEG]")
    assert len(set(out.entities[k] for k in present)) == len(present)
    for k in inserted:
        assert out.ref_indices[k] == k - 1


def test_batches_teach_absent_rounds_to_end_without_seg():
    from MediRoundCore.engine import Engine
    from MediRoundCore.model.processing import PromptBuilder
    from MediRoundCore.train.batching import IGNORE, make_batch

    engine = Engine.random_tiny(seed=0)
    model, tokenizer = engine.model, engine.tokenizer
    builder = PromptBuilder(tokenizer, model.token_ids, "plain", model.config.vision.num_patches)
    dlg = make_dialogue("train", 0, 7)
    sample = with_absent_rounds(to_sample(dlg), dlg.slice, np.random.default_rng(0), p=1.0)
    present = [k for k, f in enumerate(sample.meta["absent"]) if not f]
    batch = make_batch([sample], builder, model.config)
    assert batch.rounds_per_sample == [len(present)] and batch.target_masks.shape[0] == len(present)
    labels = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert labels.count(model.token_ids.seg) == len(present)
    assert labels.count(model.token_ids.eos) == sample.num_rounds  # every answer ends; absent ones without [SEG]
    # each present round's target is its own mask (absent rounds' empty masks are not targets)
    for row, k in enumerate(present):
        assert batch.target_masks[row].sum() > 0


def test_a_first_round_can_ask_for_an_absent_structure():
    """With `first`, an absent round opens the dialogue; the dialogue's own first round follows it, referring to
    nothing, as the product's resolver refers to no round answered absent."""
    dlg = make_dialogue("train", 0, 7)
    sample = to_sample(dlg)
    out = with_absent_rounds(sample, dlg.slice, np.random.default_rng(0), p=0.0, first=1.0)
    assert out.num_rounds == sample.num_rounds + 1 and out.meta["absent"] == [True] + [False] * sample.num_rounds
    assert is_absent_answer(out.answers[0]) and out.ref_indices[0] is None and not out.masks[0].any()
    assert out.queries[1:] == sample.queries and out.ref_indices[1] is None
    assert [None if r is None else r - 1 for r in out.ref_indices[2:]] == sample.ref_indices[1:]


def test_repeated_rounds_ask_again_as_the_product_reads_them():
    """An inserted repeat asks for an earlier round's structure (never an absent one), reads its name as "it"
    (refer_as_it, as the engine does), refers to that round and gets its answer and mask."""
    from MediRoundCore.data.repeats import with_repeated_rounds
    from MediRoundCore.references import named_round, refer_as_it

    dlg = make_dialogue("train", 0, 7)
    base = with_absent_rounds(to_sample(dlg), dlg.slice, np.random.default_rng(2), p=0.5, first=1.0)
    out = with_repeated_rounds(base, np.random.default_rng(3), p=1.0)
    repeats = [k for k, f in enumerate(out.meta["repeat"]) if f]
    can_repeat = [k for k in range(base.num_rounds - 1) if not all(base.meta["absent"][:k + 1])]
    assert base.meta["absent"][0] and len(repeats) == len(can_repeat) and len(out.meta["absent"]) == out.num_rounds
    kept = [k for k, f in enumerate(out.meta["repeat"]) if not f]
    assert [out.queries[k] for k in kept] == base.queries
    assert [out.meta["absent"][k] for k in kept] == base.meta["absent"]
    for k in repeats:
        j = out.ref_indices[k]
        assert j < k and not out.meta["absent"][j] and out.masks[j].any()
        assert out.answers[k] == out.answers[j] and np.array_equal(out.masks[k], out.masks[j])
        assert out.entities[k] == out.entities[j]
        assert refer_as_it(out.queries[k], out.entities[j]) == out.queries[k]  # already read as the engine reads it
    for k_new, k_old in zip(kept, range(base.num_rounds)):  # the dialogue's own references follow their rounds
        old = base.ref_indices[k_old]
        assert (out.ref_indices[k_new] is None) == (old is None)
        if old is not None:
            assert np.array_equal(out.masks[out.ref_indices[k_new]], base.masks[old])
    said_it = sum(" it" in out.queries[k].lower() for k in repeats)
    assert said_it >= len(repeats) // 2, [out.queries[k] for k in repeats]
    assert named_round("Segment the spleen.", ["liver", "spleen"]) == 2  # how a user's repeat finds its round


def test_round_numbers_in_the_text_follow_the_inserted_rounds():
    """An answer that cites "… from round 2" cites the same round at its new number after rounds are inserted
    before it (and "the one from round 2" in a query likewise), or the model learns to cite wrong rounds."""
    import re

    from MediRoundCore.data.repeats import with_repeated_rounds

    dlg, sample = next((d, s) for d in (make_dialogue("train", 0, i) for i in range(60))
                       for s in [to_sample(d)] if any("from round" in a for a in s.answers))
    out = with_absent_rounds(sample, dlg.slice, np.random.default_rng(0), p=0.0, first=1.0)
    shifted = [re.sub(r"round (\d+)", lambda m: f"round {int(m.group(1)) + 1}", a) for a in sample.answers]
    assert out.answers[1:] == shifted and out.answers[1:] != sample.answers
    again = with_repeated_rounds(out, np.random.default_rng(1), p=1.0)
    kept = [k for k, f in enumerate(again.meta["repeat"]) if not f]
    for k_new, k_old in zip(kept, range(out.num_rounds)):
        for cited in re.findall(r"round (\d+)", again.answers[k_new]):
            old = int(re.findall(r"round (\d+)", out.answers[k_old])[0])
            assert int(cited) == kept[old - 1] + 1  # the same round, at its new number
