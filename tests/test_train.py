"""Trainers: a few-step stage-1 run whose loss falls, resume after interruption, stage 2 trains only the JCM."""

import itertools

import numpy as np
import pytest

import torch

from MediRoundCore.data.splits import iter_training_samples
from MediRoundCore.engine import Engine
from MediRoundCore.train.batching import make_batch, sample_tokens
from MediRoundCore.train.trainer import TrainConfig, Trainer


def fixed_stream(n=2):
    samples = list(itertools.islice(iter_training_samples(seed=5), n))
    return lambda seed: itertools.cycle(samples)


def test_seg_positions_predict_seg_token(tiny_engine):
    sample = next(iter_training_samples(seed=1))
    ids, labels, positions = sample_tokens(sample, tiny_engine.builder)
    assert len(positions) == sample.num_rounds
    assert all(ids[p + 1] == tiny_engine.model.token_ids.seg for p in positions)
    assert all(labels[p + 1] == tiny_engine.model.token_ids.seg for p in positions)
    batch = make_batch([sample], tiny_engine.builder, tiny_engine.model.config)
    assert batch.crop_pixels.shape[0] == sum(r is not None for r in sample.ref_indices)
    assert batch.target_masks.shape[0] == sample.num_rounds


def test_few_steps_loss_falls(tmp_path):
    engine = Engine.random_tiny(seed=1)
    cfg = TrainConfig(str(tmp_path), steps=14, batch_size=2, warmup_steps=2, lr=1e-3, save_every=100, log_every=1)
    history = Trainer(engine.model, engine.tokenizer, cfg, fixed_stream()).train(progress=False)
    first, last = history[0], history[-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert last["ce"] < first["ce"] and last["bce"] < first["bce"]
    assert (tmp_path / "log_stage1.csv").read_text().count("\n") == 15
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def test_resume_continues_from_checkpoint(tmp_path):
    engine = Engine.random_tiny(seed=2)
    cfg = TrainConfig(str(tmp_path), steps=2, batch_size=1, warmup_steps=1, save_every=2)
    Trainer(engine.model, engine.tokenizer, cfg, fixed_stream(1)).train(progress=False)
    saved = {k: v.clone() for k, v in engine.model.state_dict().items()}
    fresh = Engine.random_tiny(seed=3)  # different initial weights: resume must overwrite them
    cfg.steps = 3
    trainer = Trainer(fresh.model, fresh.tokenizer, cfg, fixed_stream(1))
    assert trainer.step == 2
    assert all(torch.equal(saved[k], v) for k, v in fresh.model.state_dict().items())
    assert trainer.optimizer.state_dict()["state"]
    history = trainer.train(progress=False)
    assert [row["step"] for row in history] == [3]


def test_stage2_trains_only_jcm(tmp_path):
    engine = Engine.random_tiny(seed=4)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    cfg = TrainConfig(str(tmp_path), stage=2, steps=2, batch_size=1, warmup_steps=1, save_every=100)
    history = Trainer(engine.model, engine.tokenizer, cfg, fixed_stream(1)).train(progress=False)
    after = engine.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("jcm.") for k in changed)
    assert {"judgment", "bce", "dice", "iou"} <= set(history[0])


def test_varied_stream_rewords_inserts_absent_rounds_and_crops(tiny_engine):
    """`mediround train --paraphrase --absent --repeat --fov-crop`: the same dialogues as the plain stream, some
    queries re-worded, absent rounds (no [SEG], empty mask, referring to the round before or, opening the
    dialogue, to none; never referred to) and repeats of earlier rounds inserted, some slices cropped; batches
    build with one target per segmented round."""
    from MediRoundCore.data.absent import is_absent_answer
    from MediRoundCore.train.run import training_stream

    plain = list(itertools.islice(training_stream("train")(3), 12))
    varied = list(itertools.islice(training_stream("train", fov_crop=0.5, paraphrase=1.0, absent=0.3,
                                                   repeat=0.3)(3), 12))
    first = [next(a for k, a in enumerate(v.answers) if not v.meta["absent"][k]) for v in varied]
    assert [p.answers[0] for p in plain] == first  # same dialogues
    assert sum(p.queries[0] != v.queries[0] for p, v in zip(plain, varied)) >= 8
    absent = [(v, k) for v in varied for k, a in enumerate(v.answers) if is_absent_answer(a)]
    assert len(absent) >= 3 and any(k == 0 for _, k in absent)
    for v, k in absent:
        assert not v.masks[k].any() and v.ref_indices[k] == (None if k == 0 else k - 1) and k not in v.ref_indices
    repeats = [(v, k) for v in varied for k, f in enumerate(v.meta["repeat"]) if f]
    assert len(repeats) >= 3
    for v, k in repeats:
        j = v.ref_indices[k]
        assert j < k and v.answers[j] == v.answers[k] and np.array_equal(v.masks[j], v.masks[k])
    assert sum(v.image.shape != p.image.shape for p, v in zip(plain, varied)) >= 3
    batch = make_batch(varied[:4], tiny_engine.builder, tiny_engine.model.config)
    segmented = sum(not is_absent_answer(a) for v in varied[:4] for a in v.answers)
    assert batch.target_masks.shape[0] == len(batch.seg_positions) == segmented


def test_stage1_leaves_the_jcm_unapplied_until_stage2_trains_it(tmp_path):
    """A stage-1 checkpoint records its JCM as untrained (random or stale), and asking with JCM on then decodes
    the prompt uncorrected; stage 2 records it trained and it corrects again. Unrecorded (older) checkpoints keep it."""
    from MediRoundCore.model.modeling import MediRound

    engine = Engine.random_tiny(seed=6)
    model = engine.model.eval()
    assert model.config.jcm.trained is None and model.jcm_usable
    size = model.config.segmenter.image_size
    with torch.no_grad():
        embedding = model.encode_segmenter_image(torch.zeros(1, 3, size, size))
    prompts = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))

    def decode(m, use_jcm):
        with torch.no_grad():
            return m.decode_masks(embedding, prompts, use_jcm=use_jcm, beta=1.0,
                                  pixels=torch.zeros(1, 3, size, size))

    assert not torch.equal(decode(model, True).low_res_logits, decode(model, False).low_res_logits)
    cfg = TrainConfig(str(tmp_path / "s1"), steps=1, batch_size=1, warmup_steps=1, save_every=1)
    Trainer(model, engine.tokenizer, cfg, fixed_stream(1)).train(progress=False)
    stage1, _ = MediRound.from_pretrained(tmp_path / "s1" / "checkpoint")
    stage1.eval()
    assert stage1.config.jcm.trained is False and not stage1.jcm_usable
    on, off = decode(stage1, True), decode(stage1, False)
    assert on.scores is None and torch.equal(on.low_res_logits, off.low_res_logits)
    cfg2 = TrainConfig(str(tmp_path / "s2"), stage=2, steps=1, batch_size=1, warmup_steps=1, save_every=1)
    Trainer(stage1, engine.tokenizer, cfg2, fixed_stream(1)).train(progress=False)
    stage2, _ = MediRound.from_pretrained(tmp_path / "s2" / "checkpoint")
    stage2.eval()
    assert stage2.config.jcm.trained is True
    on = decode(stage2, True)
    assert on.scores is not None and not torch.equal(on.low_res_logits, decode(stage2, False).low_res_logits)


def test_jcm_trained_is_true_false_or_unrecorded():
    from MediRoundCore.errors import ConfigError
    from MediRoundCore.model.config import MediRoundConfig, tiny_config

    data = tiny_config().to_dict()
    data["jcm"].pop("trained")
    assert MediRoundConfig.from_dict(data).jcm.trained is None  # written before the field: applied as trained
    for value in (True, False):
        assert MediRoundConfig.from_dict({**data, "jcm": {**data["jcm"], "trained": value}}).jcm.trained is value
    with pytest.raises(ConfigError, match="jcm.trained"):
        MediRoundConfig.from_dict({**data, "jcm": {**data["jcm"], "trained": "false"}})
