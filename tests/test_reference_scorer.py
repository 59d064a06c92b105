"""The learned reference scorer (reference_scorer.py): where it sits in the resolver's precedence, that it learns
what "it" means from generated dialogues, that it travels with the model (export, Engine.load), and that the
shipped one beats "the previous round" on rounds of a split it was not trained on."""

from __future__ import annotations

import numpy as np
import pytest

from MediRoundCore.errors import CheckpointError
from MediRoundCore.reference_scorer import CONFIG_FILE, WEIGHTS_FILE, ReferenceScorer, ReferenceScorerConfig
from MediRoundCore.references import resolve_reference
from MediRoundCore.train.reference_scorer import agreement, dialogue_rounds, fit, previous_round_agreement


class _Always:
    """A scorer that always picks round `n` (to test precedence only)."""

    def __init__(self, n):
        self.n = n

    def choose(self, query, entities, referable=None):
        return self.n if referable is None or referable[self.n - 1] else None


ENTITIES = ["left kidney", "spleen", "liver"]


def test_precedence_explicit_then_named_then_scorer_then_previous():
    assert resolve_reference("the lesion inside it", ENTITIES, explicit=2, scorer=_Always(1)) == 2
    assert resolve_reference("go back to the spleen", ENTITIES, scorer=_Always(1)) == 2  # named beats scorer
    assert resolve_reference("the lesion in round 3", ENTITIES, scorer=_Always(1)) == 3
    assert resolve_reference("the lesion inside it", ENTITIES, scorer=_Always(1)) == 1
    assert resolve_reference("the lesion inside it", ENTITIES) == 3  # no scorer: the previous round
    assert resolve_reference("the lesion inside it", [], scorer=_Always(1)) is None


def test_rounds_answered_absent_are_referred_to_only_by_number():
    """A round answered "not on this slice" has no mask: neither the scorer, nor the previous-round fallback, nor
    its entity's name picks it; "round 2" still does."""
    entities, referable = ["left kidney", "heart", "liver"], [True, False, False]
    assert resolve_reference("the lesion inside it", entities, scorer=_Always(2), referable=referable) == 1
    assert resolve_reference("the lesion inside it", entities, referable=referable) == 1
    assert resolve_reference("now segment the heart", entities, referable=referable) == 1
    assert resolve_reference("the heart in round 2", entities, referable=referable) == 2
    assert resolve_reference("the lesion inside it", entities, referable=[False] * 3) is None
    assert resolve_reference("the lesion inside it", entities, scorer=_Always(2), referable=[False] * 3) is None
    with pytest.raises(ValueError, match="flags"):
        resolve_reference("x", entities, referable=[True])


def _rounds(n):
    """Hand-made rounds where "its partner" always means the latest kidney, whatever came after it."""
    rng = np.random.default_rng(0)
    others = ["spleen", "liver", "aorta", "vertebra", "gallbladder"]
    rounds = []
    for _ in range(n):
        entities = list(rng.choice(others, size=int(rng.integers(1, 5)), replace=False))
        k = int(rng.integers(0, len(entities) + 1))
        entities.insert(k, str(rng.choice(["left kidney", "right kidney"])))
        rounds.append({"query": "Now segment its partner on the other side.", "entities": entities, "ref": k})
    return rounds


def test_fit_learns_what_it_means():
    train, held_out = _rounds(300), _rounds(80)[40:]
    scorer = fit(train, ReferenceScorerConfig(buckets=1 << 12), epochs=3, progress=False)
    assert previous_round_agreement(held_out) < 0.5
    assert agreement(scorer, held_out) == 1.0
    # rounds that cannot be referred to are never chosen: the best of the rest, or None when none is left
    query, entities = held_out[0]["query"], held_out[0]["entities"]
    best = scorer.choose(query, entities)
    referable = [number != best for number in range(1, len(entities) + 1)]
    second = scorer.choose(query, entities, referable)
    order = np.argsort(-scorer.scores(query, entities))
    assert second != best and second == int(order[1]) + 1
    assert scorer.choose(query, entities, [False] * len(entities)) is None


def test_save_and_load(tmp_path):
    scorer = fit(_rounds(100), ReferenceScorerConfig(buckets=1 << 12), epochs=2, progress=False)
    scorer.save_pretrained(tmp_path)
    loaded = ReferenceScorer.from_pretrained(tmp_path)
    query, entities = "Now segment its partner on the other side.", ["left kidney", "spleen", "liver"]
    assert np.allclose(loaded.scores(query, entities), scorer.scores(query, entities), atol=1e-2)  # fp16 on disk
    assert ReferenceScorer.from_pretrained(tmp_path / "missing") is None  # a model without one


def test_broken_files_are_named(tmp_path):
    ReferenceScorer(ReferenceScorerConfig(buckets=16)).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="unreadable reference scorer"):
        ReferenceScorer.from_pretrained(tmp_path)
    ReferenceScorer(ReferenceScorerConfig(buckets=16)).save_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"buckets": 32}')
    with pytest.raises(CheckpointError, match="do not fit"):
        ReferenceScorer.from_pretrained(tmp_path)
    from safetensors.numpy import save_file

    (tmp_path / CONFIG_FILE).write_text('{"buckets": 4}')
    save_file({"weights": np.array([0, np.nan, 0, 0], np.float16)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="not finite"):
        ReferenceScorer.from_pretrained(tmp_path)


def test_export_keeps_the_scorer_and_makes_answer_drafts(tmp_path):
    from MediRoundCore.engine import Engine
    from MediRoundCore.train.export import export_default

    engine = Engine.random_tiny()
    checkpoint = tmp_path / "ckpt"
    engine.model.save_pretrained(checkpoint, engine.tokenizer)
    dest = tmp_path / "shipped"
    scorer = fit(_rounds(60), ReferenceScorerConfig(buckets=1 << 12), epochs=1, progress=False)
    scorer.save_pretrained(dest)  # the folder's scorer survives an export of a checkpoint without one
    export_default(checkpoint, dest, drafts_dialogues=10)
    engine = Engine.load(dest, device="cpu")
    loaded = engine.reference_scorer
    assert loaded is not None and np.array_equal(loaded.weights, ReferenceScorer.from_pretrained(dest).weights)
    assert np.count_nonzero(loaded.weights) > 0
    assert engine.answer_drafts is not None and engine.answer_drafts.table  # made for the checkpoint's tokenizer


def test_export_writes_the_bundled_folder_of_the_checkpoints_size(tmp_path, monkeypatch):
    """Without --dest a tiny checkpoint goes to weights/mediround-tiny: it never replaces the default lite model
    (runs/ship.sh exports without --dest)."""
    import MediRoundCore.train.export as export
    from MediRoundCore.engine import Engine

    weights = tmp_path / "weights"
    monkeypatch.setattr(export, "DEFAULT_CHECKPOINT", weights / "mediround-lite")
    (weights / "mediround-lite").mkdir(parents=True)
    (weights / "mediround-lite" / "config.json").write_text('{"size": "lite"}')
    engine = Engine.random_tiny()
    engine.model.save_pretrained(tmp_path / "ckpt", engine.tokenizer)
    assert export.export_default(tmp_path / "ckpt", drafts_dialogues=0) == weights / "mediround-tiny"
    assert (weights / "mediround-tiny" / "model.safetensors").is_file()
    assert (weights / "mediround-lite" / "config.json").read_text() == '{"size": "lite"}'


def test_the_shipped_scorer_beats_the_previous_round_on_val():
    """Val dialogues (never trained on; the scorer is trained on the train splits): the rounds whose query names
    no round, with their template wording."""
    from MediRoundCore.engine import DEFAULT_CHECKPOINT

    scorer = ReferenceScorer.from_pretrained(DEFAULT_CHECKPOINT)
    assert scorer is not None, "the shipped model has no reference scorer"
    rounds = [r for i in range(40) for r in dialogue_rounds("val", 0, i)]
    assert len(rounds) > 100
    assert agreement(scorer, rounds) >= previous_round_agreement(rounds) + 0.10


def test_the_engine_asks_with_the_scorers_pick(ct_volume):
    from MediRoundCore.engine import Engine
    from MediRoundCore.imaging import extract_slice
    from MediRoundCore.session import Session

    engine = Engine.random_tiny(reference_scorer=_Always(1))
    session = Session(ct_volume.fingerprint())
    image = extract_slice(ct_volume, "axial", 1)
    for query in ("Segment the spleen.", "Segment the liver."):
        engine.ask(session, query, image)
    assert engine.ask(session, "Now the lesion inside it.", image).round.reference == 1
    assert engine.ask(session, "Now the lesion inside it.", image, reference=2).round.reference == 2
