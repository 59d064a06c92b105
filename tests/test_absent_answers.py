"""Absent targets at inference: an answer that says the structure is not on the slice gives no segment."""

import json

import numpy as np
import pytest
import torch

from MediRoundCore.answers import ABSENT_TEXT, format_answer, says_absent
from MediRoundCore.data.absent import ABSENT_TEXT as TRAINED_TEXT
from MediRoundCore.data.absent import absent_answer, is_absent_answer


def test_the_engine_reads_the_wording_training_teaches():
    assert ABSENT_TEXT == TRAINED_TEXT
    answer = absent_answer("liver").replace("[SEG]", "")
    assert says_absent(answer) and is_absent_answer(answer)
    assert says_absent("Liver:  NOT on this\nslice.")
    assert not says_absent(format_answer("liver", "the large organ on the right"))
    assert not says_absent("liver: not on this slice. [SEG]")  # asked for a segment: one is drawn
    assert not says_absent("liver: the large organ on this slice")


STEPS = 200  # 100 memorised the answers on one float path of the decoder and not on another (130-250 all do)


@pytest.fixture(scope="module")
def trained():
    """A random tiny model trained a few steps on one dialogue: present, absent, present (no references)."""
    from MediRoundCore.data.dataset import Sample
    from MediRoundCore.data.splits import make_dialogue, to_sample
    from MediRoundCore.engine import Engine
    from MediRoundCore.model.modeling import stage1_losses
    from MediRoundCore.train.batching import make_batch

    base = to_sample(make_dialogue("train", 0, 7))
    sample = Sample(image=base.image, queries=["Segment the liver.", "Segment the heart.", "Segment the spleen."],
                    answers=[format_answer("liver", "the big organ"), absent_answer("heart"),
                             format_answer("spleen", "the small organ")],
                    masks=np.stack([base.masks[0], np.zeros_like(base.masks[0]), base.masks[-1]]),
                    ref_indices=[None, None, None], entities=["liver", "heart", "spleen"])
    # the answers' words in the tokenizer: spelt out letter by letter (tokenizers 0.23), a few hundred steps on one
    # dialogue did not teach "not on this slice" (it answered "not on this smaice")
    engine = Engine.random_tiny(seed=0, corpus=tuple(a.lower() for a in sample.answers) * 20)
    model = engine.model
    torch.manual_seed(0)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = make_batch([sample], engine.builder, model.config)
    model.train()
    for _ in range(STEPS):
        loss = stage1_losses(model, batch)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model.config.max_answer_tokens = 32  # random_tiny keeps 12, too few for a whole answer in its small vocabulary
    engine.forget()
    return engine, sample


def test_an_absent_answer_draws_nothing_and_is_saved(trained, tmp_path):
    from MediRoundCore.evaluate.protocol import sample_image
    from MediRoundCore.session import Session

    engine, sample = trained
    session = Session("absent-test", folder=tmp_path)
    image = sample_image(sample)
    rounds = [engine.ask(session, q, image).round for q in sample.queries]
    present, absent, after = rounds
    assert ABSENT_TEXT in absent.answer
    assert absent.absent and not absent.seg_forced and not absent.mask.any() and absent.jcm_score is None
    assert "[SEG]" not in absent.answer and "closed with one" not in absent.answer
    # the rounds around it segment, and the history after the absent round (EOS only, as trained) holds
    # (a few hundred steps teach the words and [SEG], not yet the masks)
    assert not present.absent and not present.seg_forced and present.entity == "liver"
    assert not after.absent and not after.seg_forced
    # the same rounds with the history rebuilt from the session (no cache) end the same way
    engine.forget()
    session2 = Session("absent-test-2")
    again = [engine.ask(session2, q, image).round for q in sample.queries[:2]]
    engine.forget()
    third = engine.ask(session2, sample.queries[2], image).round
    assert [r.absent for r in again + [third]] == [False, True, False]

    session.save()
    loaded = Session.load(tmp_path)
    assert [r.absent for r in loaded.rounds] == [False, True, False]
    # a session.json written before the flag existed loads, every round present
    path = tmp_path / "session.json"
    data = json.loads(path.read_text())
    for item in data["rounds"]:
        item.pop("absent")
    path.write_text(json.dumps(data))
    assert [r.absent for r in Session.load(tmp_path).rounds] == [False, False, False]


def test_an_answer_without_seg_that_is_not_absent_is_still_closed_with_one():
    """DESIGN: a segmentation request whose answer ends without [SEG] is closed with one."""
    from MediRoundCore.engine import Engine
    from MediRoundCore.evaluate.protocol import sample_image
    from MediRoundCore.data.splits import make_dialogue, to_sample
    from MediRoundCore.session import Session

    engine = Engine.random_tiny(seed=0)  # untrained: babbles to the token limit without [SEG]
    sample = to_sample(make_dialogue("train", 0, 3))
    r = engine.ask(Session("forced"), sample.queries[0], sample_image(sample)).round
    assert r.seg_forced and not r.absent and "closed with one" in r.answer
