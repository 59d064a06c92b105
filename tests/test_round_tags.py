"""Round numbers in the prompt text (`MediRoundConfig.round_tags`, the lite preset): each answer opens with
"round N:" and a query with a reference says "(about round M)"; training batches, the engine's incremental
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
    assert "(about round 1) now the lesion inside it.\nassistant: round 3: lesion" in text
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
