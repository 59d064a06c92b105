"""Exact speculative decoding with answer drafts (model/answer_drafts.py, `Engine._generate`): the draft table
from answer token sequences, its file, and the engine's answers, masks and cache with drafts equal to plain
greedy decoding, in fewer language-model forwards (the shipped model with its bundled table; an untrained model
at its answer-token limit)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from MediRoundCore.engine import DEFAULT_CHECKPOINT, Engine
from MediRoundCore.errors import CheckpointError
from MediRoundCore.imaging import extract_slice
from MediRoundCore.model.answer_drafts import DRAFTS_FILE, AnswerDrafts
from MediRoundCore.session import Session
from conftest import needs_shipped_model

SEG = 99


def test_drafts_chain_likely_continuations_and_stop_where_answers_differ():
    answers = [[1, 2, 3, 4, 5, SEG], [1, 2, 3, 4, 6, SEG], [7, 2, 3, 8, SEG]]
    drafts = AnswerDrafts.from_answers(answers, vocab_size=100, max_tokens=6, min_share=0.6, stop={SEG})
    assert drafts.draft([1]) == [2, 3, 4]  # then 5 or 6, each half: below the share
    assert drafts.draft([7]) == [2, 3, 8]  # three tokens of context tell the two answers apart, [SEG] ends it
    assert drafts.draft([1, 2, 3, 4, 5]) == []
    assert drafts.draft([1], limit=2) == [2, 3]
    assert drafts.draft([]) == [1, 2, 3, 4]  # an answer's first tokens are drafted from the start context
    assert AnswerDrafts.from_answers(answers, 100, min_share=0.6).draft([7]) == [2, 3, 8, SEG]  # no stop set


def test_drafts_file_round_trip_and_errors(tmp_path):
    drafts = AnswerDrafts.from_answers([[1, 2, 3, SEG]], vocab_size=100, stop={SEG})
    drafts.save(tmp_path)
    loaded = AnswerDrafts.from_pretrained(tmp_path, vocab_size=100, stop={SEG})
    assert loaded.table == drafts.table and loaded.draft([1]) == [2, 3]
    assert AnswerDrafts.from_pretrained(tmp_path / "nothing", vocab_size=100) is None
    with pytest.raises(CheckpointError, match="vocabulary of 100 tokens.*rebuild"):
        AnswerDrafts.from_pretrained(tmp_path, vocab_size=101)
    (tmp_path / DRAFTS_FILE).write_text(json.dumps({"format": 1, "contexts": []}))
    with pytest.raises(CheckpointError, match="unreadable answer drafts"):
        AnswerDrafts.from_pretrained(tmp_path, vocab_size=100)


def _run(engine, volume, queries, refs):
    session = Session(volume.fingerprint(), volume_name=volume.name)
    image = extract_slice(volume, "axial", 0)
    engine.forward_log.clear()
    rounds = [engine.ask(session, q, image, reference=r).round for q, r in zip(queries, refs)]
    generated = engine._session_memory(session)["answers"]  # the answer token ids, by round number
    return rounds, list(engine.forward_log), [generated[r.number] for r in rounds]


def _same_rounds(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.answer == b.answer and a.seg_forced == b.seg_forced and a.absent == b.absent
        assert np.array_equal(a.mask, b.mask)


@needs_shipped_model
@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / DRAFTS_FILE).is_file(), reason="no shipped model in this checkout")
def test_shipped_model_answers_equal_greedy_decoding_in_fewer_forwards(one_torch_thread):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_cpu import dialogue_and_volume  # the benchmark's dialogue on its slice

    queries, refs, volume, _ = dialogue_and_volume(0, 8, 256)
    engine = Engine.load(device="cpu")
    assert engine.answer_drafts is not None
    drafted, drafted_forwards, _ = _run(engine, volume, queries, refs)
    engine.answer_drafts = None
    plain, plain_forwards, _ = _run(engine, volume, queries, refs)
    _same_rounds(drafted, plain)
    assert sum(len(r.answer) for r in plain) > 0
    assert len(drafted_forwards) < 0.6 * len(plain_forwards)  # measured: 72 against 184 over 10 rounds


def test_drafts_at_the_answer_token_limit_equal_greedy_decoding(ct_volume):
    """An untrained model babbles to its limit (12 tokens), closed with [SEG]: drafts made from its own babble
    are accepted, and the limit, the forced closure and the cache after rejected drafts (round 2's, which
    round 3 reads) stay as without."""
    queries, refs = ["segment the liver", "now the lesion inside it", "and the spleen"], [None, 1, None]
    plain_engine = Engine.random_tiny(0)
    plain, _, babble = _run(plain_engine, ct_volume, queries, refs)
    assert all(r.seg_forced for r in plain) and all(len(b) == 12 for b in babble)
    engine = Engine.random_tiny(0)
    ids = engine.model.token_ids
    engine.answer_drafts = AnswerDrafts.from_answers([babble[0], babble[1][:5] + [300, 301, ids.image], babble[2]],
                                                     engine.model.config.text.vocab_size, min_share=0.0,
                                                     stop={ids.seg, ids.eos})  # not the image placeholder
    drafted, forwards, _ = _run(engine, ct_volume, queries, refs)
    _same_rounds(drafted, plain)
    (state,) = engine._slices.values()
    assert sum(forwards) > state.cache_len  # drafted tokens were rejected and cut from the cache
    assert len(forwards) < 3 * 13  # fewer than one forward per answer token
