"""Prediction-like reference masks for training, and the residual JCM correction."""

import itertools

import numpy as np
import pytest
import torch

from MediRoundCore.data.splits import iter_training_samples
from MediRoundCore.engine import Engine
from MediRoundCore.model.jcm import JudgmentCorrection
from MediRoundCore.train.batching import make_batch
from MediRoundCore.train.reference_noise import KINDS, perturb_reference
from MediRoundCore.train.run import use_residual_correction
from MediRoundCore.train.trainer import TrainConfig, Trainer


def disc(h=64, w=64, cy=30, cx=34, r=9):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_each_perturbation_changes_the_mask_in_its_own_way():
    mask = disc()
    rng = np.random.default_rng(0)
    grown, shrunk = perturb_reference(mask, rng, "grow"), perturb_reference(mask, rng, "shrink")
    assert grown.sum() > mask.sum() and grown[mask].all()
    assert 0 < shrunk.sum() < mask.sum() and mask[shrunk].all()
    cut = perturb_reference(mask, rng, "cut")
    assert 0.5 * mask.sum() < cut.sum() < mask.sum() and mask[cut].all()
    shifted = [perturb_reference(mask, np.random.default_rng(s), "shift") for s in range(6)]
    assert all(s.sum() == mask.sum() for s in shifted)  # away from the border a shift keeps the area
    assert any(not np.array_equal(s, mask) for s in shifted)


def test_perturbation_is_seeded_never_empty_and_names_bad_kinds():
    tiny = np.zeros((20, 20), bool)
    tiny[5, 5] = True
    for seed in range(20):
        for kind in KINDS:
            assert perturb_reference(tiny, np.random.default_rng(seed), kind).any()
    empty = np.zeros((8, 8), bool)
    assert not perturb_reference(empty, np.random.default_rng(0)).any()
    a = perturb_reference(disc(), np.random.default_rng(7))
    b = perturb_reference(disc(), np.random.default_rng(7))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_reference(disc(), np.random.default_rng(0), "blur")


def test_batches_with_reference_noise_change_only_the_reference_inputs(tiny_engine):
    sample = next(s for s in iter_training_samples(seed=2) if any(r is not None for r in s.ref_indices))
    config, builder = tiny_engine.model.config, tiny_engine.builder
    clean = make_batch([sample], builder, config)
    noisy = make_batch([sample], builder, config, reference_noise=1.0, rng=np.random.default_rng(0))
    assert not torch.equal(clean.boxes, noisy.boxes) or not torch.equal(clean.crop_pixels, noisy.crop_pixels)
    assert torch.equal(clean.target_masks, noisy.target_masks) and torch.equal(clean.input_ids, noisy.input_ids)
    none = make_batch([sample], builder, config, reference_noise=0.0, rng=np.random.default_rng(0))
    assert torch.equal(clean.boxes, none.boxes)
    with pytest.raises(ValueError, match="random generator"):
        make_batch([sample], builder, config, reference_noise=0.5)


def test_training_mixture_alternates_splits_and_rejects_test_splits():
    splits = [s.meta["split"] for s in itertools.islice(iter_training_samples(seed=0, split="train+train-long"), 4)]
    assert splits == ["train", "train-long", "train", "train-long"]
    long_rounds = [s.num_rounds for s in itertools.islice(iter_training_samples(seed=1, split="train-long"), 8)]
    assert min(long_rounds) >= 4 and max(long_rounds) <= 10
    with pytest.raises(ValueError, match="not a training split"):
        next(iter_training_samples(split="train+hard"))


def test_residual_correction_starts_as_identity_and_round_trips(tmp_path):
    torch.manual_seed(0)
    jcm = JudgmentCorrection(residual_correction=True)
    x = torch.randn(5, 256)
    assert torch.equal(jcm.correction(x), x)
    plain = JudgmentCorrection()
    assert not torch.allclose(plain.correction(x), x)

    engine = Engine.random_tiny(seed=6)
    use_residual_correction(engine.model)
    assert engine.model.config.jcm.residual_correction
    stream = list(itertools.islice(iter_training_samples(seed=5), 1))
    cfg = TrainConfig(str(tmp_path), stage=2, steps=2, batch_size=1, warmup_steps=1, lr=1e-3, save_every=2,
                      reference_noise=0.5)
    Trainer(engine.model, engine.tokenizer, cfg, lambda seed: itertools.cycle(stream)).train(progress=False)
    assert not torch.equal(engine.model.jcm.correction(x), x)  # trained away from the identity
    from MediRoundCore.model.modeling import MediRound

    loaded, _ = MediRound.from_pretrained(tmp_path / "checkpoint")
    assert loaded.config.jcm.residual_correction
    assert torch.allclose(loaded.jcm.correction(x), engine.model.jcm.correction(x))


def test_residual_correction_is_refused_outside_stage_2(tmp_path):
    from MediRoundCore.train.run import run_training

    with pytest.raises(ValueError, match="belongs to stage 2"):
        run_training(tmp_path, stage=1, steps=1, residual_correction=True)
    assert not (tmp_path / "stage1").exists()


def test_correction_focus_weighs_masks_by_how_poor_they_are():
    from MediRoundCore.model.modeling import masked_bce, masked_dice

    torch.manual_seed(0)
    logits = torch.randn(3, 16, 16)
    target = (torch.rand(3, 16, 16) > 0.5).float()
    valid = torch.ones(3, 16, 16)
    uniform = torch.ones(3)
    assert torch.allclose(masked_bce(logits, target, valid, sample_weights=uniform), masked_bce(logits, target, valid))
    assert torch.allclose(masked_dice(logits, target, valid, sample_weights=uniform), masked_dice(logits, target, valid))
    only_first = torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(masked_bce(logits, target, valid, sample_weights=only_first),
                          masked_bce(logits[:1], target[:1], valid[:1]))
    assert torch.allclose(masked_dice(logits, target, valid, sample_weights=only_first),
                          masked_dice(logits[:1], target[:1], valid[:1]))


def test_stage2_with_correction_focus_trains_the_jcm(tmp_path):
    from MediRoundCore.train.run import run_training

    with pytest.raises(ValueError, match="belongs to stage 2"):
        run_training(tmp_path, stage=1, steps=1, correction_focus=True)
    engine = Engine.random_tiny(seed=4)
    use_residual_correction(engine.model)
    before = {k: v.clone() for k, v in engine.model.jcm.state_dict().items()}
    stream = lambda seed: itertools.islice(iter_training_samples(seed=seed), 100)  # noqa: E731
    cfg = TrainConfig(str(tmp_path / "s2"), stage=2, steps=2, batch_size=2, warmup_steps=1, save_every=100,
                      correction_focus=True)
    history = Trainer(engine.model, engine.tokenizer, cfg, stream).train(progress=False)
    assert all(np.isfinite(row["loss"]) for row in history)
    after = engine.model.jcm.state_dict()
    assert not torch.equal(before["correction.fc3.weight"], after["correction.fc3.weight"])  # the correction learned
