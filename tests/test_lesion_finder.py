"""The lesion finder: which lesion kind (or none) each cell of the segmenter embedding shows, read over an earlier
round's mask; trained from pool views through the embedding cache, saved and loaded safely, and weighed into
the reference scorer's guess."""

import numpy as np
import pytest
import torch

from MediRoundCore.errors import CheckpointError
from MediRoundCore.lesion_finder import (CONFIG_FILE, COUNT_MISMATCH, SPOT_P, WEIGHTS_FILE, LesionFinder,
                                         LesionFinderConfig, container_weights, counts_tell, lesion_kinds_asked,
                                         lesion_named_by_size)
from MediRoundCore.reference_scorer import ReferenceScorer, ScorerWithEvidence
from MediRoundCore.references import close_alternatives, reference_candidates, resolve_reference
from MediRoundCore.train import lesion_finder as training


SOLID = ("lesion", "nodule", "tumour")


@pytest.mark.parametrize("query, expected", [
    ("Now the cystic lesion inside it.", ("cyst",)),
    ("Segment the nodule within it.", ("nodule",)),
    ("Next, the nodule in it, please.", ("nodule",)),
    ("And the tumor in that one?", ("tumour",)),
    ("Outline the abnormality contained in it.", SOLID),
    ("Show me the mass.", SOLID),
    ("Segment the left kidney.", None),
    ("Segment the nodule in front of it.", None),  # related otherwise than inside: the round need not hold it
    ("I also need the nodule next to it.", None),
    ("The cyst larger than it.", None),
    ("Now the cystic nodule in it.", ("cyst", "nodule")),
    ("Segment the metastases in it.", SOLID),
    ("The lesion arising from it.", SOLID),
    ("Segment the growth plate of it.", None),
    ("", None),
])
def test_which_lesion_kinds_a_query_asks_for_inside_a_round(query, expected):
    assert lesion_kinds_asked(query) == expected


def _synthetic_view(rng, g=12, channels=16, kind=None, organ=(slice(2, 7), slice(2, 7))):
    """An embedding of noise where a lesion shows as +4 on channel 1 (lesion) or 2 (cyst), inside `organ`;
    labels of every cell. Stands in for LiteMedSAM's embedding, in which a lesion's cells differ from the
    organ's (the shipped finder's held-out report, MediRoundCore/train/lesion_finder.py)."""
    emb = torch.from_numpy(rng.normal(size=(channels, g, g)).astype(np.float32))
    labels = torch.zeros(g, g, dtype=torch.long)
    if kind is not None:
        rows, cols = organ
        r, c = rows.start + 1, cols.start + 1
        emb[1 + kind, r:r + 2, c:c + 2] += 4.0
        labels[r:r + 2, c:c + 2] = 1 + kind
    return emb, labels


def _frame(g, organ, scale=4):
    mask = torch.zeros(g * scale, g * scale, dtype=torch.bool)
    mask[organ[0].start * scale:organ[0].stop * scale, organ[1].start * scale:organ[1].stop * scale] = True
    return mask


def test_trained_on_cells_it_finds_the_organ_that_holds_the_kind_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    views = []
    for i in range(60):
        emb, labels = _synthetic_view(rng, kind=[None, 0, 1][i % 3])
        views.append(training.ViewCells(emb.permute(1, 2, 0).reshape(-1, 16).half(), labels.reshape(-1), [], None))
    config = LesionFinderConfig(channels=16, hidden=8, kinds=["lesion", "cyst"])
    finder = training.fit(views, config, steps=1000, batch=1024)
    # a new slice: a cyst in the organ on the left, nothing in the one on the right
    left, right = (slice(2, 7), slice(1, 6)), (slice(2, 7), slice(6, 11))
    emb, _ = _synthetic_view(np.random.default_rng(1), kind=1, organ=left)
    frames = torch.stack([_frame(12, left), _frame(12, right), torch.zeros(48, 48, dtype=torch.bool)])
    cyst = finder.presence(emb[None], frames, ("cyst",))
    anything = finder.presence(emb[None], frames, None)
    solid = finder.presence(emb[None], frames, ("lesion",))
    assert cyst[0] > 0.8 and cyst[1] < 0.3 and np.isnan(cyst[2]), cyst  # a mask on no cell: NaN
    assert anything[0] > 0.8 and anything[1] < 0.3
    assert solid[0] < 0.3  # a cyst is not the solid lesion asked for
    with pytest.raises(ValueError, match="unknown lesion kind"):
        finder.presence(emb[None], frames, ("polyp",))
    with pytest.raises(ValueError, match="one slice's embedding"):
        finder.presence(torch.stack([emb, emb]), frames)

    # saved and read back: the same answers; the first layer reads raw embeddings (standardisation folded in)
    finder.save_pretrained(tmp_path)
    again = LesionFinder.from_pretrained(tmp_path)
    assert np.allclose(again.presence(emb[None], frames, ("cyst",)), cyst, atol=1e-6, equal_nan=True)
    assert again.config.kinds == ["lesion", "cyst"]


def test_a_model_folder_without_a_finder_has_none_and_a_bad_one_is_refused(tmp_path):
    assert LesionFinder.from_pretrained(tmp_path) is None
    LesionFinder(LesionFinderConfig(channels=8, hidden=4)).save_pretrained(tmp_path)
    assert LesionFinder.from_pretrained(tmp_path) is not None
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable lesion finder"):
        LesionFinder.from_pretrained(tmp_path)
    broken = LesionFinder(LesionFinderConfig(channels=8, hidden=4))
    with torch.no_grad():
        broken.head[0].weight[0, 0] = float("nan")
    broken.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not finite"):
        LesionFinder.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"channels": 8, "hidden": 4, "colour": "red"}')
    with pytest.raises(CheckpointError, match="unreadable lesion finder"):
        LesionFinder.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"channels": 8, "hidden": 4, "version": 99}')
    with pytest.raises(CheckpointError, match="version 99"):
        LesionFinder.from_pretrained(tmp_path)


def _scorer(entities, query, favourite):
    """A reference scorer that prefers round `favourite` (1-based) for `query` after `entities` by about 1 (a
    probability about e times the others')."""
    scorer = ReferenceScorer()
    ids = scorer.candidate_ids(query, entities)[favourite - 1]
    scorer.weights[ids] += 1.0 / len(ids)
    return scorer


def test_the_image_evidence_reorders_the_guesses_and_the_alternatives():
    entities = ["right lung", "left lung", "heart"]
    query = "Now the nodule within it."
    scorer = _scorer(entities, query, favourite=2)
    assert resolve_reference(query, entities, scorer=scorer) == 2
    # the image says the right lung holds the nodule, the left one hardly
    weighed = ScorerWithEvidence(scorer, np.log([0.9, 0.05, 0.01]))
    assert resolve_reference(query, entities, scorer=weighed) == 1
    assert reference_candidates(query, entities, scorer=weighed) == [1, 2, 3]
    assert close_alternatives(query, entities, 1, weighed) == []
    # even evidence leaves the scorer's order
    even = ScorerWithEvidence(scorer, np.log([0.5, 0.5, 0.5]))
    assert reference_candidates(query, entities, scorer=even) == reference_candidates(query, entities, scorer=scorer)
    with pytest.raises(ValueError, match="2 evidence values for 3 rounds"):
        ScorerWithEvidence(scorer, np.log([0.5, 0.5])).scores(query, entities)


def test_training_reads_the_pools_cached_embeddings_and_saves_the_finder(tmp_path, capsys):
    """`python -m MediRoundCore.train.lesion_finder` on a small lite model: the views the ledger lists are read
    back from the cache (none encoded again), a finder of the encoder's width is saved beside the model, and a
    cache with no ledger gets an error that says what to run."""
    from test_lite_training import small_lite

    from MediRoundCore.model.modeling import MediRound
    from MediRoundCore.train.embedding_cache import EmbeddingCache
    from MediRoundCore.train.lite import encode_pool, pool_ledger
    from MediRoundCore.train.lite_data import PoolConfig

    model, tokenizer = small_lite()
    model.config.base_weights = {}  # toy widths: every tensor in the folder
    model.save_pretrained(tmp_path / "model", tokenizer)
    model, _ = MediRound.from_pretrained(tmp_path / "model")
    model.eval()
    model.embedding_cache = cache = EmbeddingCache(tmp_path / "cache", model)
    encode_pool(model, PoolConfig(slices=12, views=1), cache, progress=False, ledger=pool_ledger(cache))

    assert training.main(["--model", str(tmp_path / "model"), "--cache", str(tmp_path / "cache"), "--steps", "20",
                          "--hidden", "8", "--views", "1"]) == 0
    out = capsys.readouterr().out
    assert "training views, 1 held out; cache hits 12, encoded 0" in out, out
    finder = LesionFinder.from_pretrained(tmp_path / "model")
    assert (finder.config.channels, finder.config.hidden) == (256, 8)
    assert training.main(["--model", str(tmp_path / "model"), "--cache", str(tmp_path / "empty")]) == 2
    assert "no pool entries listed" in capsys.readouterr().err


def test_export_keeps_the_folders_finder_only_when_trained_on_the_same_encoder(tmp_path, capsys):
    """Re-exporting a model into the shipped folder (train/export.py) keeps its lesion finder when the finder was
    trained on that model's segmenter encoder, and drops it, saying so, when not: a finder reads one encoder's
    embeddings."""
    from MediRoundCore.engine import Engine
    from MediRoundCore.train.embedding_cache import encoder_fingerprint
    from MediRoundCore.train.export import export_default

    engine = Engine.random_tiny()
    checkpoint, dest = tmp_path / "ckpt", tmp_path / "shipped"
    engine.model.save_pretrained(checkpoint, engine.tokenizer)
    LesionFinder(LesionFinderConfig(hidden=4, encoder=encoder_fingerprint(engine.model))).save_pretrained(dest)
    export_default(checkpoint, dest, drafts_dialogues=0)
    assert Engine.load(dest, device="cpu").lesion_finder is not None
    LesionFinder(LesionFinderConfig(hidden=4, encoder="another encoder")).save_pretrained(dest)
    export_default(checkpoint, dest, drafts_dialogues=0)
    assert "was trained on another segmenter encoder and is not kept" in capsys.readouterr().out
    assert Engine.load(dest, device="cpu").lesion_finder is None


def _engine_with_rounds():
    """A random tiny engine with a flat reference scorer (every round scores alike, so the image evidence alone
    orders the guesses) and a random lesion finder; a session of four rounds: two organs on the asked slice, a
    lesion round on it, and an organ on another slice."""
    from MediRoundCore.engine import Engine
    from MediRoundCore.imaging import SliceImage
    from MediRoundCore.session import Round, Session

    engine = Engine.random_tiny()
    engine.reference_scorer = ReferenceScorer(config=None, weights=None)
    torch.manual_seed(3)
    engine.lesion_finder = LesionFinder(LesionFinderConfig(hidden=16)).eval()
    rng = np.random.default_rng(0)
    image = SliceImage((rng.random((96, 96)) * 400 - 200).astype(np.float32), "axial", 5, 2, False, False, False)
    session = Session("volume")
    for number, (entity, index, box) in enumerate([
            ("right lung", 5, (10, 60, 5, 45)), ("left lung", 5, (10, 60, 50, 90)),
            ("nodule in the left lung", 5, (30, 40, 60, 70)), ("liver", 9, (20, 70, 20, 70))], start=1):
        mask = np.zeros((96, 96), bool)
        mask[box[0]:box[1], box[2]:box[3]] = True
        session.add_round(Round(number=number, view="axial", slice_index=index, query=f"Segment the {entity}.",
                                answer=f"{entity}: here.", entity=entity, reference=None, mask=mask))
    return engine, session, image


def test_the_engine_weighs_its_guess_by_what_the_finder_sees_in_each_round():
    engine, session, image = _engine_with_rounds()
    state = engine._slice_state(session, image, {}, None)
    query = "Now the nodule within it."
    timings = {}
    weighed = engine._scorer_with_image(session, query, None, state, image, timings)
    from MediRoundCore.model.processing import masks_to_segmenter_frame

    masks = np.stack([state.padding.pad(r.mask) for r in session.rounds[:2]])
    frames = masks_to_segmenter_frame(masks, state.input_hw, engine.model.config.segmenter.image_size)
    seen = engine.lesion_finder.presence(state.seg_embedding, frames, ("nodule",))
    spots = engine.lesion_finder.spots(state.seg_embedding, frames, ("nodule",))
    # the lungs by what the finder sees in them, less where no cell is as sure as a spot's (SPOT_P) or it sees
    # more than one nodule for "the nodule"; the nodule round itself and the liver on another slice: even
    sure = seen > SPOT_P
    fits = np.where(sure & (spots <= 1), 1.0, 0.3)
    assert np.allclose(np.exp(weighed.log_evidence), list(np.clip(seen * fits, 0.01, 1)) + [0.5, 0.5])
    # "the larger nodule" is one of two: a lung where the finder sees fewer weighs less
    paired = engine._scorer_with_image(session, "Now the larger nodule within it.", None, state, image, {})
    fits = np.where(sure & (spots >= 2), 1.0, 0.3)
    assert np.allclose(np.exp(paired.log_evidence), list(np.clip(seen * fits, 0.01, 1)) + [0.5, 0.5])
    # a tumour is not counted (large, it shows as several spots), but it must be seen
    tumour = engine._scorer_with_image(session, "Now the larger tumour within it.", None, state, image, {})
    seen = engine.lesion_finder.presence(state.seg_embedding, frames, ("tumour",))
    fits = np.where(seen > SPOT_P, 1.0, 0.3)
    assert np.allclose(np.exp(tumour.log_evidence), list(np.clip(seen * fits, 0.01, 1)) + [0.5, 0.5])
    assert "lesion_finder_ms" in timings
    # no evidence where it cannot change the choice or the query asks otherwise
    for q, explicit in [(query, 2), ("Segment the heart.", None), ("Now the nodule in front of it.", None),
                        ("Now the nodule within round 1.", None)]:
        assert engine._scorer_with_image(session, q, explicit, state, image, {}) is engine.reference_scorer
    # the Ask refers where the evidence points (the scorer is flat), and the server asks for every round's slice
    best = int(np.argmax(weighed.scores(query, session.entities))) + 1
    assert engine.ask(session, query, image).round.reference == best
    session.undo()
    assert engine.possible_references(session, query) == [1, 2, 3, 4]
    assert engine.possible_references(session, "Segment the heart.") == [1, 2, 3]  # the scorer's three


@pytest.mark.parametrize("p_nodule, weight", [(0.9, 0.9), (0.6, 0.6 * 0.3)])
def test_a_round_where_no_cell_is_as_sure_as_a_spot_weighs_less(p_nodule, weight):
    """A finder that sees a nodule with the same probability in every cell: each lung's evidence is that
    probability, times the count mismatch weight (0.3) where it is not above SPOT_P; each lung's cells then form
    one spot, as many as "the nodule" asks."""
    engine, session, image = _engine_with_rounds()
    state = engine._slice_state(session, image, {}, None)
    finder = LesionFinder(LesionFinderConfig(channels=state.seg_embedding.shape[1], hidden=0, kinds=["nodule"]))
    with torch.no_grad():
        finder.head.weight.zero_()
        finder.head.bias.copy_(torch.tensor([0.0, float(np.log(p_nodule / (1 - p_nodule)))]))
    engine.lesion_finder = finder.eval()
    weighed = engine._scorer_with_image(session, "Now the nodule within it.", None, state, image, {})
    assert np.allclose(np.exp(weighed.log_evidence), [weight, weight, 0.5, 0.5], atol=1e-4)


def test_with_one_round_to_refer_to_the_finder_is_not_asked():
    engine, session, image = _engine_with_rounds()
    for _ in range(3):
        session.undo()
    state = engine._slice_state(session, image, {}, None)
    assert engine._scorer_with_image(session, "Now the nodule within it.", None, state, image, {}) \
        is engine.reference_scorer


@pytest.mark.parametrize("query, by_size", [
    ("Now the larger nodule inside it.", True),
    ("Segment the smallest cyst in it.", True),
    ("Which part of it is the bigger tumour?", True),
    ("Now the nodule inside it.", False),
    ("Segment the lesion in it.", False),
])
def test_a_lesion_query_by_size_means_one_of_two(query, by_size):
    assert lesion_named_by_size(query) is by_size


def _two_one_none():
    """A finder whose nodule logit is 10 × channel 0 − 5: cells with channel 0 at 1 are nodules (p ≈ 1), at 0 none.
    Organ A holds two 2×2 nodules and a one-cell speck, organ B one 2×3 nodule, organ C none. (finder, embedding,
    the organs' frame masks)"""
    finder = LesionFinder(LesionFinderConfig(channels=2, hidden=0, kinds=["nodule"])).eval()
    with torch.no_grad():
        finder.head.weight.zero_()
        finder.head.bias.zero_()
        finder.head.weight[1, 0] = 10.0
        finder.head.bias[1] = -5.0
    g = 16
    emb = torch.zeros(1, 2, g, g)
    for rows, cols in [(slice(1, 3), slice(1, 3)), (slice(5, 7), slice(4, 6)), (slice(1, 2), slice(6, 7)),
                       (slice(10, 12), slice(10, 13))]:
        emb[0, 0, rows, cols] = 1.0
    organs = [(slice(0, 8), slice(0, 8)), (slice(9, 14), slice(9, 15)), (slice(0, 8), slice(9, 15))]
    return finder, emb, torch.stack([_frame(g, organ) for organ in organs])


def test_spots_count_separate_groups_of_lesion_cells_in_each_mask():
    finder, emb, frames = _two_one_none()
    assert finder.spots(emb, frames, ("nodule",)).tolist() == [2, 1, 0]
    assert finder.spots(emb, frames, ("nodule",), min_cells=1).tolist() == [3, 1, 0]  # the speck counts too
    assert finder.spots(emb, frames, ("nodule",), min_cells=5).tolist() == [0, 1, 0]
    presence = finder.presence(emb, frames, ("nodule",))
    assert presence[0] > 0.99 and presence[1] > 0.99 and presence[2] < 0.01
    # two cells touching at a corner, in organ C, are one spot of two cells
    emb[0, 0, 2, 11] = 1.0
    emb[0, 0, 3, 12] = 1.0
    assert finder.spots(emb, frames, ("nodule",)).tolist() == [2, 1, 1]


def test_each_rounds_weight_is_its_strongest_cell_less_where_the_count_does_not_fit_the_wording():
    """Organ A holds two nodules, B one, C none (_two_one_none); a mask on no cell has no weight (NaN)."""
    finder, emb, frames = _two_one_none()
    frames = torch.cat([frames, torch.zeros_like(frames[:1])])
    cells = finder.cell_probabilities(emb, frames, ("nodule",))
    seen, none = 1 / (1 + np.exp(-5.0)), 1 / (1 + np.exp(5.0))  # a nodule cell's probability, organ C's strongest
    larger = container_weights(cells, ("nodule",), "Now the larger nodule inside it.")
    assert np.allclose(larger[:3], [seen, seen * COUNT_MISMATCH, none * COUNT_MISMATCH], atol=1e-5)
    assert np.isnan(larger[3])
    plain = container_weights(cells, ("nodule",), "Now the nodule inside it.")
    assert np.allclose(plain[:3], [seen * COUNT_MISMATCH, seen, none * COUNT_MISMATCH], atol=1e-5)
    assert np.allclose(container_weights(cells, ("nodule",), "Now the nodule inside it.", mismatch=0.1)[:3],
                       [seen * 0.1, seen, none * 0.1], atol=1e-5)


def test_counts_are_read_unless_only_tumours_are_asked_for():
    assert counts_tell(("nodule",)) and counts_tell(("lesion", "nodule", "tumour")) and counts_tell(("cyst",))
    assert not counts_tell(("tumour",))
