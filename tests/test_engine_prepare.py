"""Encoding ahead (`Engine.prepare`): the slice is encoded and the dialogue's cache filled before the query is known;
the Ask that follows starts at its query and answers exactly as an Ask without the prepare."""

import numpy as np
import pytest
import torch

from MediRoundCore.engine import Engine
from MediRoundCore.errors import MediRoundError
from MediRoundCore.imaging import extract_slice
from MediRoundCore.session import Session

QUERIES = [("Segment the liver.", None), ("Now the lesion inside it.", None), ("The organ next to round 1.", 1)]


def fresh(engine, **kwargs) -> Engine:
    """Another engine on the same model and tokenizer, with empty caches."""
    return Engine(engine.model, engine.tokenizer, **kwargs)


def same_round(a, b):
    assert a.round.answer == b.round.answer and a.round.entity == b.round.entity
    assert a.round.reference == b.round.reference
    assert torch.equal(a.raw_prompt, b.raw_prompt) and torch.equal(a.prompt, b.prompt)
    assert np.array_equal(a.mask, b.mask)


def test_ask_after_prepare_is_the_ask_without_it_and_skips_the_encoders(tiny_engine, ct_volume):
    ahead, plain = fresh(tiny_engine), fresh(tiny_engine)
    image = extract_slice(ct_volume, "axial", 2)
    s_ahead, s_plain = Session(ct_volume.fingerprint()), Session(ct_volume.fingerprint())
    prefix = len(ahead.builder.prefix())
    for n, (query, ref) in enumerate(QUERIES, start=1):
        done = ahead.prepare(s_ahead, image)
        if n == 1:  # encoders and the image prefix ran here, before the query was known
            assert {"segmenter_encoder_ms", "vision_tower_ms", "prefix_ms", "total_ms"} <= set(done)
            assert ahead.forward_log == [prefix]
        else:  # after a round on this slice its cache is ready: nothing to do
            assert done == {}
        logged = len(ahead.forward_log)
        a = ahead.ask(s_ahead, query, image, reference=ref)
        b = plain.ask(s_plain, query, image, reference=ref)
        same_round(a, b)
        # the Ask ran neither encoder nor the prefix: its first forward is its query (after round 1 with the
        # previous answer's closing [SEG] EOS)
        assert not {"segmenter_encoder_ms", "vision_tower_ms", "prefix_ms"} & set(a.round.timings)
        query_tokens = len(ahead.builder.user(query, a.round.reference is not None, first=n == 1))
        assert a.forward_tokens[0] == (0 if n == 1 else 2) + query_tokens
        assert ahead.forward_log[logged:] == a.forward_tokens
        if n == 1:  # the Ask alone fed the image prefix first
            assert "segmenter_encoder_ms" in b.round.timings and b.forward_tokens[0] == prefix
            assert b.forward_tokens[1:] == a.forward_tokens
        else:
            assert b.forward_tokens == a.forward_tokens


def test_prepare_on_another_slice_then_ask_there(tiny_engine, ct_volume):
    """Round 1 on slice 2; the user scrolls to slice 4 (prepared while they type), round 2 there: the prefix with
    round 1 was rebuilt ahead, and the round equals the one of an engine that never prepared."""
    ahead, plain = fresh(tiny_engine), fresh(tiny_engine)
    s_ahead, s_plain = Session(ct_volume.fingerprint()), Session(ct_volume.fingerprint())
    s_ahead.volume = s_plain.volume = ct_volume
    first, other = extract_slice(ct_volume, "axial", 2), extract_slice(ct_volume, "axial", 4)
    same_round(ahead.ask(s_ahead, "Segment the liver.", first), plain.ask(s_plain, "Segment the liver.", first))
    done = ahead.prepare(s_ahead, other)
    assert {"segmenter_encoder_ms", "prefix_ms"} <= set(done)
    a = ahead.ask(s_ahead, "Now the lesion inside it.", other)
    b = plain.ask(s_plain, "Now the lesion inside it.", other)
    same_round(a, b)
    assert "prefix_ms" not in a.round.timings and "prefix_ms" in b.round.timings


def test_prepare_after_undo_and_a_new_round_rebuilds(tiny_engine, ct_volume):
    """Round 2 asked on slice 4, undone, asked again differently there; back on slice 2 (whose cache was last
    filled ahead with rounds 1 and the first round 2) a prepare must rebuild: the redone round 2 has the same
    number as the undone one. Round 3 then equals an engine that re-reads the whole conversation."""
    ahead = fresh(tiny_engine)
    naive = fresh(tiny_engine, reuse_cache=False)
    s_ahead, s_naive = Session(ct_volume.fingerprint()), Session(ct_volume.fingerprint())
    s_ahead.volume = s_naive.volume = ct_volume
    a2, a4 = extract_slice(ct_volume, "axial", 2), extract_slice(ct_volume, "axial", 4)
    ahead.ask(s_ahead, "Segment the liver.", a2)
    ahead.ask(s_ahead, "Segment the spleen.", a4)
    assert ahead.prepare(s_ahead, a2).keys() >= {"prefix_ms"}  # slice 2 now holds rounds 1 and 2
    assert ahead.prepare(s_ahead, a2) == {}  # ready: nothing to do
    s_ahead.undo()
    redone = ahead.ask(s_ahead, "Segment the left kidney.", a4)
    assert redone.round.number == 2
    done = ahead.prepare(s_ahead, a2)
    assert "prefix_ms" in done and "segmenter_encoder_ms" not in done  # rebuilt from the cached encoding
    third = ahead.ask(s_ahead, "The organ next to round 1.", a2, reference=1)
    assert "prefix_ms" not in third.round.timings
    for query, image, ref in [("Segment the liver.", a2, None), ("Segment the left kidney.", a4, None),
                              ("The organ next to round 1.", a2, 1)]:
        want = naive.ask(s_naive, query, image, reference=ref)
    assert third.round.answer == want.round.answer
    assert torch.allclose(third.raw_prompt, want.raw_prompt, atol=1e-4)
    assert np.array_equal(third.mask, want.mask)
    # undo without a new round: the prepare drops round 2 from slice 4's cache as well
    s_ahead.undo()
    s_ahead.undo()
    assert "prefix_ms" in ahead.prepare(s_ahead, a4)
    again = ahead.ask(s_ahead, "Segment the left kidney.", a4)
    assert again.round.number == 2 and again.round.answer == redone.round.answer
    assert np.array_equal(again.mask, redone.mask)


def test_prepare_refuses_what_is_not_a_slice(tiny_engine, ct_volume):
    with pytest.raises(MediRoundError, match="SliceImage"):
        tiny_engine.prepare(Session(ct_volume.fingerprint()), np.zeros((4, 4)))
