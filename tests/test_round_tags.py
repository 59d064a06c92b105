"""Round numbers in the prompt text (`MediRoundConfig.round_tags`, the lite preset): each answer opens with
"round N:" and a query with a reference says "(about round M: <its entity>)"; training batches, the engine's incremental
prompt and its full rebuild all read the same tokens; models without tags are unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from MediRoundCore.data.dataset import Sample
from MediRoundCore.engine import Engine
from MediRoundCore.imaging import extract_slice
from MediRoundCore.model.config import lite_config, tiny_config
from MediRoundCore.model.processing import PromptBuilder
from MediRoundCore.session import Session
from MediRoundCore.train.batching import sample_tokens


@pytest.fixture(scope="module")
def tagged(tiny_engine):
    """The random tiny engine's model with round tags switched on (a copy: the shared fixture stays untagged)."""
    model = copy.deepcopy(tiny_engine.model)
    model.config.round_tags = True
    return model, tiny_engine.tokenizer


def test_the_lite_preset_tags_rounds_and_tiny_does_not():
    assert lite_config().round_tags and not tiny_config().round_tags


def test_a_tagged_user_turn(tagged, tiny_engine):
    model, tokenizer = tagged
    builder = PromptBuilder.for_model(tokenizer, model)
    turn = builder.user("Now the lesion inside it.", True, False, number=3, reference=1)
    assert turn[:turn.index(model.token_ids.crop)] == builder._encode("user:")
    text = builder.decode(turn)
    assert text.endswith("(about round 1) now the lesion inside it.\nassistant: round 3:")
    named = builder.user("Now the lesion inside it.", True, False, number=3, reference=1, reference_entity="left kidney")
    assert builder.decode(named).endswith("(about round 1: left kidney) now the lesion inside it.\nassistant: round 3:")
    assert builder.decode(builder.user("Segment the liver.", False, True, number=1)).endswith("assistant: round 1:")
    with pytest.raises(ValueError, match="round numbers"):
        builder.user("Segment the liver.", False, True)
    # an untagged model's turn is as before, whatever numbers it is given
    plain = tiny_engine.builder
    assert plain.user("Segment the liver.", False, True, number=4, reference=2) == plain.user("Segment the liver.",
                                                                                              False, True)


def test_training_tokens_carry_the_dialogues_numbers(tagged):
    model, tokenizer = tagged
    builder = PromptBuilder.for_model(tokenizer, model)
    masks = np.zeros((3, 8, 8), bool)
    masks[:, 2:5, 2:5] = True
    sample = Sample(image=np.zeros((8, 8), np.float32), queries=["Segment the liver.", "Segment the spleen.",
                                                                  "Now the lesion inside it."],
                    answers=["liver: big. [SEG]", "spleen: small. [SEG]", "lesion in the liver: round. [SEG]"],
                    masks=masks, ref_indices=[None, None, 0], entities=["liver", "spleen", "lesion in the liver"])
    ids, labels, _ = sample_tokens(sample, builder)
    text = builder.decode(ids)
    assert "assistant: round 1: liver" in text and "assistant: round 2: spleen" in text
    assert "(about round 1: liver) now the lesion inside it.\nassistant: round 3: lesion" in text
    # the tags are read, never learnt: no label on them
    opening = builder._encode(" round 3:")
    start = next(i for i in range(len(ids)) if ids[i:i + len(opening)] == opening)
    assert all(label == -100 for label in labels[start:start + len(opening)])


def test_the_engine_reads_the_tags_the_same_incrementally_and_rebuilt(tagged, ct_volume):
    model, tokenizer = tagged
    cached, rebuilt = Engine(model, tokenizer), Engine(model, tokenizer, reuse_cache=False)
    image = extract_slice(ct_volume, "axial", 2)
    queries = [("Segment the liver.", None), ("Now the lesion inside it.", 1), ("Segment the spleen.", None),
               ("The organ next to it.", 2)]
    results = []
    for engine in (cached, rebuilt):
        session = Session(ct_volume.fingerprint())
        results.append([engine.ask(session, q, image, reference=ref) for q, ref in queries])
    for a, b in zip(*results):
        assert a.round.answer == b.round.answer
        torch.testing.assert_close(a.raw_prompt, b.raw_prompt, atol=1e-4, rtol=1e-4)
    # the last round's forward fed its tagged turn: the previous answer's closing [SEG] EOS, then the turn
    turn = cached.builder.user("The organ next to it.", True, False, number=4, reference=2)
    assert results[0][3].forward_tokens[0] == 2 + len(turn)


def _fed_ids(engine, session, query, image, reference):
    """Every token id the engine feeds the language model for one Ask (prefix rebuilt: reuse_cache=False)."""
    fed = []
    real = engine.model.embed_inputs

    def recording(input_ids, *args, **kwargs):
        fed.extend(input_ids.reshape(-1).tolist())
        return real(input_ids, *args, **kwargs)

    engine.model.embed_inputs = recording
    try:
        engine.ask(session, query, image, reference=reference)
    finally:
        del engine.model.embed_inputs
    return fed


def test_the_engine_feeds_a_restored_dialogue_as_training_reads_it(tagged, ct_volume):
    """A session restored from its rounds (one answered absent, two with references) and a fifth round asked on
    it: the tokens the engine feeds are the training batch's tokens of the same dialogue, through the fifth
    answer's opening."""
    from MediRoundCore.data.absent import absent_answer
    from MediRoundCore.session import Round

    model, tokenizer = tagged
    engine = Engine(model, tokenizer, reuse_cache=False)
    image = extract_slice(ct_volume, "axial", 2)
    mask = np.zeros(image.pixels.shape, bool)
    mask[10:20, 20:30] = True
    empty = np.zeros_like(mask)
    rounds = [("Segment the liver.", "liver: the largest organ. [SEG]", "liver", None, mask),
              ("Segment the spleen.", absent_answer("spleen"), "spleen", None, empty),
              ("Now the lesion inside it.", "lesion in the liver: a round spot from round 1. [SEG]",
               "lesion in the liver", 1, mask),
              ("Segment the right kidney.", "right kidney: behind the liver. [SEG]", "right kidney", None, mask),
              ("The structure next to it.", "gallbladder: next to the liver. [SEG]", "gallbladder", 3, mask)]
    session = Session(ct_volume.fingerprint())
    for number, (query, answer, entity, ref, m) in enumerate(rounds[:4], start=1):
        session.add_round(Round(number=number, view=image.view, slice_index=image.index, query=query,
                                answer=answer.replace("[SEG]", "").strip(), entity=entity, reference=ref, mask=m,
                                absent=not m.any()))
    fed = _fed_ids(engine, session, rounds[4][0], image, 3)
    sample = Sample(image=np.zeros((8, 8), np.float32), queries=[r[0] for r in rounds], answers=[r[1] for r in rounds],
                    masks=np.stack([r[4] for r in rounds]), ref_indices=[None if r[3] is None else r[3] - 1 for r in rounds],
                    entities=[r[2] for r in rounds])
    ids, _, _ = sample_tokens(sample, engine.builder)
    through_turn = len(ids) - len(engine.builder.answer("gallbladder: next to the liver."))  # then the answer
    assert fed[:through_turn] == ids[:through_turn]  # after it the engine feeds what it generates
    assert engine.builder.decode(ids[:through_turn]).endswith(
        "(about round 3: lesion in the liver) the structure next to it.\nassistant: round 5:")


def test_the_ablations_drop_what_they_say(tagged, ct_volume):
    """No history: every turn is a first one, "round 1:" and no round named; blank reference: no crop, no box,
    and no round named."""
    from MediRoundCore.evaluate.protocol import CONFIGS, EvalEngine

    model, tokenizer = tagged
    engine = EvalEngine(model, tokenizer)
    image = extract_slice(ct_volume, "axial", 2)
    texts, session_entity = {}, {}
    for name in ("ind-nojcm", "noref-nojcm", "nohistory"):
        session = Session(ct_volume.fingerprint())
        session_entity[name] = engine.ask(session, "Segment the liver.", image).round.entity
        engine.ask(session, "Segment the spleen.", image)
        with engine.mode(CONFIGS[name]):
            text = engine.builder.decode(_fed_ids(engine, session, "Now the lesion inside it.", image, 1))
            opening = text.index("assistant: round")
            texts[name] = text[:text.index(":", opening + len("assistant: round")) + 1]  # not what it generated
        engine.forget()
    entity = session_entity["ind-nojcm"]  # what the random model's first answer named (if anything)
    about = f"(about round 1: {entity})" if entity else "(about round 1)"
    assert texts["ind-nojcm"].endswith(f"{about} now the lesion inside it.\nassistant: round 3:")
    assert texts["noref-nojcm"].endswith(" now the lesion inside it.\nassistant: round 3:")
    assert "about round" not in texts["noref-nojcm"]
    assert texts["nohistory"].endswith(" now the lesion inside it.\nassistant: round 1:")
    assert "about round" not in texts["nohistory"] and "spleen" not in texts["nohistory"]


def test_configs_written_before_tags_stay_untagged(tmp_path):
    import json

    from MediRoundCore.errors import ConfigError
    from MediRoundCore.model.config import MediRoundConfig

    data = lite_config().to_dict()
    data.pop("round_tags")
    assert MediRoundConfig.from_dict(json.loads(json.dumps(data))).round_tags is False
    with pytest.raises(ConfigError, match="round_tags"):
        MediRoundConfig.from_dict({**data, "round_tags": "false"})


def test_a_training_run_keeps_the_layout_it_continues(tmp_path):
    """train.lite: as asked; else as the checkpoint or snapshot continued (untagged when written before tags);
    else the preset's."""
    import json

    from MediRoundCore.train.lite import _round_tags

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "config.json").write_text(json.dumps({"size": "lite"}))
    (new / "config.json").write_text(json.dumps({"size": "lite", "round_tags": True}))
    assert _round_tags(None, old, True) is False and _round_tags(None, new, False) is True
    assert _round_tags(None, None, True) is True and _round_tags("off", new, True) is False
    assert _round_tags("on", old, False) is True


def test_a_synced_round_must_refer_to_an_earlier_one():
    """The server's wire form: a reference that is not a whole number of an earlier round is refused (tagged, it
    would be read as "(about round True)")."""
    from MediRoundCore.remote.protocol import round_from_wire, round_to_wire
    from MediRoundCore.session import Round

    good = Round(number=2, view="axial", slice_index=0, query="q", answer="a", entity=None, reference=1,
                 mask=np.zeros((4, 4), bool))
    assert round_from_wire(round_to_wire(good)).reference == 1
    for bad in (True, 2, 5, 0, 1.0, "1"):
        data = {**round_to_wire(good), "reference": bad}
        data.pop("digest", None)
        with pytest.raises(ValueError, match="reference"):
            round_from_wire(data)
