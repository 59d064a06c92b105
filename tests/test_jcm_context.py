"""The context-aware JCM correction (our option): it also sees the prompt's first decode."""

import itertools

import pytest
import torch

from MediRoundCore.data.splits import iter_training_samples
from MediRoundCore.engine import Engine
from MediRoundCore.imaging import extract_slice
from MediRoundCore.model.jcm import JudgmentCorrection
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.session import Session
from MediRoundCore.train.run import run_training, use_residual_correction
from MediRoundCore.train.trainer import TrainConfig, Trainer


def context_engine(seed=3) -> Engine:
    engine = Engine.random_tiny(seed=seed)
    use_residual_correction(engine.model, context=True)
    return engine


def test_context_correction_starts_as_identity_and_needs_its_context():
    torch.manual_seed(0)
    jcm = JudgmentCorrection(residual_correction=True, correction_context=True)
    assert jcm.uses_context and not JudgmentCorrection().uses_context
    x, context = torch.randn(4, 256), torch.randn(4, 512)
    assert torch.equal(jcm.correction(x, context), x)
    with pytest.raises(ValueError, match="context"):
        jcm.correction(x)


def test_context_pools_the_image_embedding_under_the_first_decode():
    model = context_engine().model.eval()
    grid = model.config.segmenter.embedding_size
    channel_values = torch.linspace(-2, 3, 256)
    constant = channel_values.reshape(1, 256, 1, 1).expand(1, 256, grid, grid)
    prompts = torch.randn(3, 256)
    with torch.no_grad():
        context = model.correction_context(constant, prompts)
        _, mask_tokens = model.decode_with_tokens(constant, prompts)
    assert context.shape == (3, 512)
    # a weighted mean of a constant map is that constant, whatever the mask
    assert torch.allclose(context[:, :256], channel_values.expand(3, -1), atol=1e-4)
    assert torch.allclose(context[:, 256:], mask_tokens)
    varied = torch.randn(1, 256, grid, grid)
    with torch.no_grad():
        pooled = model.correction_context(varied, prompts)[:, :256]
    low, high = varied.amin((-2, -1)), varied.amax((-2, -1))
    assert bool(((pooled >= low - 1e-5) & (pooled <= high + 1e-5)).all())  # a convex combination per channel


def test_decode_masks_corrects_with_the_context(tmp_path, ct_volume):
    engine = context_engine()
    model = engine.model.eval()
    stream = list(itertools.islice(iter_training_samples(seed=5), 2))
    cfg = TrainConfig(str(tmp_path), stage=2, steps=3, batch_size=2, warmup_steps=1, lr=1e-3, save_every=3,
                      correction_focus=True)
    before = model.jcm.correction.context.weight.clone()
    Trainer(model, engine.tokenizer, cfg, lambda seed: itertools.cycle(stream)).train(progress=False)
    assert not torch.equal(before, model.jcm.correction.context.weight)  # the context projection learned
    model.eval()
    grid = model.config.segmenter.embedding_size
    embedding, prompts = torch.randn(1, 256, grid, grid), torch.randn(2, 256)
    with torch.no_grad():
        out = model.decode_masks(embedding, prompts, use_jcm=True, beta=1.0)  # every prompt is corrected
        expected = model.jcm.correction(prompts, model.correction_context(embedding, prompts))
        kept = model.decode_masks(embedding, prompts, use_jcm=True, beta=0.0)
    assert bool(out.corrected.all()) and torch.allclose(out.prompts, expected, atol=1e-6)
    assert not torch.allclose(out.prompts, prompts)
    assert torch.equal(kept.prompts[~kept.corrected], prompts[~kept.corrected])
    scores = model.jcm.quality(prompts).detach()
    with torch.no_grad():
        mixed = model.decode_masks(embedding, prompts, use_jcm=True, beta=float(scores.min()))  # the lowest only
    low = int(scores.argmin())
    assert mixed.corrected.tolist() == [k == low for k in range(2)]
    assert torch.allclose(mixed.prompts[low], out.prompts[low], atol=1e-6)  # the same context as in a full batch
    assert torch.equal(mixed.prompts[1 - low], prompts[1 - low])

    loaded, tokenizer = MediRound.from_pretrained(tmp_path / "checkpoint")
    assert loaded.config.jcm.correction_context
    with torch.no_grad():
        again = loaded.eval().decode_masks(embedding, prompts, use_jcm=True, beta=1.0)
    assert torch.allclose(again.low_res_logits, out.low_res_logits, atol=1e-5)
    session = Session(ct_volume.fingerprint())
    image = extract_slice(ct_volume, "axial", 2)
    result = Engine(loaded, tokenizer).ask(session, "Segment the liver.", image)
    assert result.round.jcm_score is not None  # a whole Ask runs through the context-aware JCM


def test_context_correction_needs_a_fresh_residual_jcm(tmp_path):
    with pytest.raises(ValueError, match="--residual-correction"):
        run_training(tmp_path, stage=2, steps=1, correction_context=True)
    assert not (tmp_path / "stage2").exists()


def test_attending_correction_reads_the_mask_surroundings(ct_volume):
    engine = Engine.random_tiny(seed=3)
    use_residual_correction(engine.model, context=True, attention=True)
    model = engine.model.eval()
    assert model.jcm.correction.context.in_features == 3 * 256
    grid = model.config.segmenter.embedding_size
    embedding, prompts = torch.randn(1, 256, grid, grid), torch.randn(3, 256)
    with torch.no_grad():
        context = model.correction_context(embedding, prompts)
        assert torch.equal(model.jcm.correction(prompts, context), prompts)  # identity until trained
        low_res, tokens = model.decode_with_tokens(embedding, prompts)
        marked = model.context_from_decode(embedding, low_res, tokens)
        flipped = model.context_from_decode(embedding, -low_res, tokens)  # inside and outside swapped
    assert context.shape == (3, 768) and torch.allclose(marked, context)
    assert torch.allclose(flipped[:, 256:512], marked[:, 256:512])  # same mask token ...
    assert not torch.allclose(flipped[:, 512:], marked[:, 512:], atol=1e-4)  # ... another reading of the image
    with pytest.raises(ValueError, match="context=True"):
        JudgmentCorrection(correction_attention=True)
    result = engine.ask(Session(ct_volume.fingerprint()), "Segment the liver.", extract_slice(ct_volume, "axial", 2),
                        beta=1.0)
    assert result.round.corrected  # a whole Ask runs through the attending correction


def test_attending_correction_needs_the_context(tmp_path):
    with pytest.raises(ValueError, match="--correction-context"):
        run_training(tmp_path, stage=2, steps=1, residual_correction=True, correction_attention=True)
