"""The refining JCM correction (our option): corrected masks are redrawn at the segmenter's full resolution."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from MediRoundCore.data.splits import iter_training_samples
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.jcm_offline import hard_dice, offline_jcm
from MediRoundCore.evaluate.protocol import EvalEngine
from MediRoundCore.imaging import extract_slice
from MediRoundCore.model.jcm import MaskRefiner
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.session import Session
from MediRoundCore.train.jcm_features import FeatureSet, add_images, collect_predicted
from MediRoundCore.train.run import run_training, use_residual_correction
from MediRoundCore.train.trainer import jcm_losses


def disc(size: int, cx: float, cy: float, radius: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= radius ** 2).float()


def coarse_logits(target: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """What a decoder at 1/factor resolution draws: the target's occupancy per cell, upsampled bilinearly, and
    a little too generous (the over-drawn small masks of SAM-style decoders)."""
    cells = F.avg_pool2d(target[:, None], factor)
    logits = torch.logit(cells.clamp(0.02, 0.98)) + 1.5
    return F.interpolate(logits, scale_factor=factor, mode="bilinear", align_corners=False)[:, 0]


def small_lesions(n: int, size: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    targets, images = [], []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=generator) * (size - 24) + 12).tolist()
        radius = float(torch.rand(1, generator=generator) * 2.5 + 2.5)
        target = disc(size, cx, cy, radius)
        targets.append(target)
        images.append(0.3 + 0.5 * target + 0.03 * torch.randn(size, size, generator=generator))
    return torch.stack(images), torch.stack(targets)


def test_refiner_starts_as_the_identity_and_redraws_only_around_the_mask():
    torch.manual_seed(0)
    refiner = MaskRefiner()
    logits = torch.full((2, 128, 128), -6.0)
    logits[0, 40:50, 60:70] = 6.0  # a 10-pixel square
    images = torch.rand(2, 128, 128)
    assert torch.equal(refiner(images, logits), logits)
    cx, cy, half = refiner.squares(logits)[0].tolist()
    assert (cx, cy) == (65.0, 45.0) and half == pytest.approx(0.75 * 10 + refiner.margin)
    assert refiner.squares(logits)[1, 2] == refiner.min_side / 2  # an empty mask: the smallest square
    torch.nn.init.normal_(refiner.head.weight, std=0.1)
    torch.nn.init.constant_(refiner.head.bias, 1.0)
    changed = (refiner(images, logits) - logits)[0].abs() > 1e-6
    ys, xs = changed.nonzero(as_tuple=True)
    assert xs.min() >= int(cx - half) and xs.max() <= int(cx + half) and ys.min() >= int(cy - half)
    assert ys.max() <= int(cy + half) and changed.sum() > (1.5 * 10) ** 2  # the whole grown square, nothing else


def test_refiner_runs_in_bfloat16_like_a_gpu_model():
    torch.manual_seed(0)
    refiner = MaskRefiner()
    torch.nn.init.normal_(refiner.head.weight, std=0.1)
    images, targets = small_lesions(2)
    logits = coarse_logits(targets)
    expected = refiner(images, logits)
    half = refiner.to(torch.bfloat16)(images, logits.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.shape == logits.shape
    assert torch.allclose(half.float(), expected, atol=0.1)


def test_refiner_learns_to_redraw_small_lesions_sharper_than_the_coarse_decoder():
    torch.manual_seed(0)
    images, targets = small_lesions(48)
    logits = coarse_logits(targets)
    weight = torch.ones_like(targets)
    refiner = MaskRefiner(channels=16)
    optimizer = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    for step in range(60):
        rows = torch.arange(step * 8, step * 8 + 8) % 32  # the first 32 train, the last 16 are held out
        refined = refiner(images[rows], logits[rows])
        loss = F.binary_cross_entropy_with_logits(refined, targets[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held = slice(32, 48)
    with torch.no_grad():
        before = hard_dice(logits[held], targets[held], weight[held]).mean()
        after = hard_dice(refiner(images[held], logits[held]), targets[held], weight[held]).mean()
    assert after > before + 0.05, (float(before), float(after))


def refiner_engine(seed=3) -> Engine:
    engine = Engine.random_tiny(seed=seed)
    use_residual_correction(engine.model, refiner=True)
    torch.manual_seed(1)
    for p in engine.model.jcm.refiner.head.parameters():  # a refiner that redraws something
        torch.nn.init.normal_(p, std=0.2)
    return engine


def test_decode_masks_redraws_only_the_corrected_masks(tmp_path, ct_volume):
    model = refiner_engine().model.eval()
    size, grid = model.config.segmenter.image_size, model.config.segmenter.embedding_size
    embedding, prompts = torch.randn(1, 256, grid, grid), torch.randn(3, 256)
    pixels = torch.rand(1, 3, size, size)
    with torch.no_grad():
        off = model.decode_masks(embedding, prompts, use_jcm=False, pixels=pixels)
        kept = model.decode_masks(embedding, prompts, use_jcm=True, beta=0.0, pixels=pixels)
        every = model.decode_masks(embedding, prompts, use_jcm=True, beta=1.0, pixels=pixels)
        scores = model.jcm.quality(prompts)
        low = int(scores.argmin())
        one = model.decode_masks(embedding, prompts, use_jcm=True, beta=float(scores.min()), pixels=pixels)
    assert off.refined_logits is None and kept.refined_logits is None and off.logits is off.low_res_logits
    assert every.logits.shape == (3, 1, size, size)
    from MediRoundCore.model.modeling import upsample_logits

    with torch.no_grad():
        expected = model.jcm.refiner(pixels.mean(1).expand(3, -1, -1), upsample_logits(model, every.low_res_logits))
    assert torch.allclose(every.logits[:, 0], expected, atol=1e-5)
    assert one.corrected.tolist() == [k == low for k in range(3)]
    assert torch.allclose(one.logits[low, 0], every.logits[low, 0], atol=1e-5)
    for k in set(range(3)) - {low}:  # the others are the decoder's logits, upsampled
        assert torch.allclose(one.logits[k, 0], upsample_logits(model, one.low_res_logits[k:k + 1])[0], atol=1e-6)
    with pytest.raises(ValueError, match="segmenter pixels"):
        model.decode_masks(embedding, prompts, use_jcm=True, beta=1.0)

    model.save_pretrained(tmp_path / "refining", Engine.random_tiny(seed=3).tokenizer)
    loaded, tokenizer = MediRound.from_pretrained(tmp_path / "refining")
    assert loaded.config.jcm.correction_refiner
    with torch.no_grad():
        again = loaded.eval().decode_masks(embedding, prompts, use_jcm=True, beta=1.0, pixels=pixels)
    assert torch.allclose(again.logits, every.logits, atol=1e-5)
    session, image = Session(ct_volume.fingerprint()), extract_slice(ct_volume, "axial", 2)
    engine = Engine(loaded, tokenizer)
    redrawn = engine.ask(session, "Segment the liver.", image, beta=1.0).round
    plain = engine.ask(Session(ct_volume.fingerprint()), "Segment the liver.", image, beta=0.0).round
    assert redrawn.corrected and not plain.corrected
    assert redrawn.mask.shape == plain.mask.shape == image.pixels.shape and redrawn.mask.dtype == bool


@pytest.fixture(scope="module")
def refiner_features():
    samples = list(itertools.islice(iter_training_samples(seed=11, split="train-long"), 3))
    engine = EvalEngine.from_engine(Engine.random_tiny(seed=4))
    return engine, samples, collect_predicted(engine, samples)


def test_features_keep_the_segmenter_images_and_add_them_to_old_files(tmp_path, refiner_features):
    from MediRoundCore.data.splits import make_dialogue, to_sample
    from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image

    engine, samples, features = refiner_features
    size = engine.model.config.segmenter.image_size
    assert features.images.shape == (3, size, size) and features.images.dtype == torch.float16
    image = sample_image(samples[2])
    session = Session(sample_fingerprint(samples[2]))
    engine.ask(session, samples[2].queries[0], image, use_jcm=False)
    assert torch.allclose(features.images[2].float(), engine.slice_pixels(session, image).mean(0), atol=1e-3)
    loaded = FeatureSet.load(features.save(tmp_path / "f.safetensors"))
    assert torch.equal(loaded.images, features.images)
    assert torch.equal(loaded.split(1)[1].batch([0]).images[0], features.images[2].float())
    bare = FeatureSet(features.prompts, features.dialogue, features.targets_packed, features.embeddings,
                      features.valid_hw, features.size)
    with pytest.raises(ValueError, match="add them"):
        FeatureSet.concat([bare, features])
    # an old file without images: they are regenerated from its split, seed and range
    old = FeatureSet(features.prompts[:0], features.dialogue[:0], features.targets_packed[:0],
                     features.embeddings[:2], features.valid_hw[:0], size,
                     {"split": "train", "seed": 0, "start": 4})
    from MediRoundCore.model.processing import segmenter_pixels

    hw = [segmenter_pixels(sample_image(to_sample(make_dialogue("train", 0, i))).normalized(), engine.model.config)[1]
          for i in (4, 5)]
    old.valid_hw = torch.tensor(hw)
    old.save(tmp_path / "old.safetensors")
    added = add_images(tmp_path / "old.safetensors", engine.model.config)
    again = FeatureSet.load(tmp_path / "old.safetensors")
    expected = segmenter_pixels(sample_image(to_sample(make_dialogue("train", 0, 5))).normalized(),
                                engine.model.config)[0].mean(0)
    assert torch.equal(again.images, added.images)
    assert torch.allclose(again.images[1].float(), expected, atol=1e-3)
    old.valid_hw = torch.tensor([hw[0], (1, 1)])
    old.images = None
    old.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="another extent"):
        add_images(tmp_path / "other.safetensors", engine.model.config)


def test_cached_stage2_trains_the_refiner(tmp_path, refiner_features):
    engine, _, features = refiner_features
    path = features.save(tmp_path / "f.safetensors")
    engine.model.save_pretrained(tmp_path / "init", engine.tokenizer)
    batch = features.batch(torch.arange(len(features)))
    model, _ = MediRound.from_pretrained(tmp_path / "init")
    use_residual_correction(model, refiner=True)
    with pytest.raises(ValueError, match="segmenter images"):
        jcm_losses(model, batch.embeddings, batch.prompts, batch.targets, batch.weight)
    out = run_training(tmp_path / "run", stage=2, steps=4, batch_size=8, init=str(tmp_path / "init"), lr=2e-3,
                       residual_correction=True, correction_refiner=True, features=str(path), progress=False,
                       save_every=4)
    trained, _ = MediRound.from_pretrained(out)
    assert trained.config.jcm.correction_refiner
    assert trained.jcm.refiner.head.weight.abs().sum() > 0  # it left the identity
    from MediRoundCore.model.modeling import upsample_logits

    trained.eval()
    with torch.no_grad():
        fixed = upsample_logits(trained, trained.decode_with_prompts(batch.embeddings,
                                                                     trained.jcm.correction(batch.prompts)))
        redrawn = trained.jcm.refiner(batch.images, fixed)
    assert not torch.allclose(redrawn, fixed)
    result = offline_jcm(trained, features)  # the offline table scores the redrawn masks
    assert result.dice_corrected == pytest.approx(hard_dice(redrawn, batch.targets, batch.weight).numpy(), abs=1e-5)
    with pytest.raises(ValueError, match="--residual-correction"):
        run_training(tmp_path / "bad", stage=2, steps=1, correction_refiner=True)
