"""Cached stage 2: features of the frozen model (on-policy and teacher-forced), training on them, and the
offline JCM table."""

import itertools

import numpy as np
import pytest
import torch

from MediRoundCore.data.splits import iter_training_samples
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.jcm_offline import offline_jcm
from MediRoundCore.evaluate.metrics import mask_counts
from MediRoundCore.evaluate.protocol import EvalEngine, sample_fingerprint, sample_image
from MediRoundCore.model.processing import PromptBuilder, masks_to_segmenter_frame
from MediRoundCore.session import Session
from MediRoundCore.train.batching import make_batch
from MediRoundCore.train.jcm_features import FeatureSet, collect_predicted, collect_teacher
from MediRoundCore.train.run import run_training, use_residual_correction
from MediRoundCore.train.trainer import TrainConfig, Trainer, jcm_losses, stage2_losses


@pytest.fixture(scope="module")
def samples():
    return list(itertools.islice(iter_training_samples(seed=11, split="train-long"), 3))


@pytest.fixture(scope="module")
def engine():
    return EvalEngine.from_engine(Engine.random_tiny(seed=4))


@pytest.fixture(scope="module")
def predicted(engine, samples):
    return collect_predicted(engine, samples)


def test_predicted_targets_lie_where_the_engine_showed_a_placed_slice(engine, samples):
    """A sample of a real scan's slice (`meta["geometry"]`: a CT region and a place off the field's centre) is
    padded to its place before the engine frames it; the collected targets are padded the same way: each target
    covers the bright square the segmenter input shows (the image is the first round's mask)."""
    import copy

    sample = copy.copy(samples[0])
    mask = np.zeros((120, 100), bool)
    mask[40:70, 30:60] = True
    sample.image = mask.astype(np.float32)
    sample.masks = np.stack([mask] * sample.num_rounds)
    sample.meta = {**(sample.meta or {}), "geometry": {"spacing": [1.5, 1.5], "region": "abdomen",
                                                       "centre_mm": [60.0, -70.0]}}
    features = collect_predicted(engine, [sample])
    target = features.batch(torch.arange(sample.num_rounds)).targets[0] > 0
    shown = sample_image(sample)
    from MediRoundCore.model.field_placement import slice_in_field
    from MediRoundCore.model.processing import segmenter_pixels

    pixels, extent, padding = slice_in_field(shown, engine.model.config)
    assert not padding.none and padding.left == 0 and padding.top > 0  # below and left of the field's centre
    bright = segmenter_pixels(pixels, engine.model.config, extent)[0][0] > 0.5
    overlap = (target & bright).sum() / (target | bright).sum()  # resampled into the frame: edges may differ
    assert bright.sum() > 0 and overlap > 0.9, float(overlap)


def test_predicted_features_are_the_protocols_rounds(engine, samples, predicted):
    assert len(predicted) == sum(s.num_rounds for s in samples) and predicted.num_dialogues == len(samples)
    size = engine.model.config.segmenter.image_size
    sample = samples[1]
    rows = (predicted.dialogue == 1).nonzero().squeeze(-1)
    # the prompts are the ones a fresh session gets round by round (dataset references, JCM off)
    session, image = Session(sample_fingerprint(sample)), sample_image(sample)
    raw = []
    for k, query in enumerate(sample.queries):
        ref = sample.ref_indices[k]
        reference = None if ref is None else ref + 1
        raw.append(engine.ask(session, query, image, reference=reference, use_jcm=False).raw_prompt)
    assert torch.allclose(predicted.prompts[rows], torch.stack(raw), atol=1e-4)
    embedding, hw = engine.slice_embedding(session, image)
    assert torch.allclose(predicted.embeddings[1].float(), embedding[0].float(), atol=1e-2)  # stored as float16
    assert tuple(predicted.valid_hw[1].tolist()) == hw
    with pytest.raises(KeyError, match="not been asked"):
        engine.slice_embedding(Session("another volume"), image)
    expected = masks_to_segmenter_frame(np.asarray(sample.masks, bool), hw, size)
    batch = predicted.batch(rows)
    assert torch.equal(batch.targets, expected)
    assert batch.weight[:, : hw[0], : hw[1]].min() == 1 and batch.weight.sum() == len(rows) * hw[0] * hw[1]


def test_features_save_load_concat_and_split(tmp_path, predicted):
    path = predicted.save(tmp_path / "a.safetensors")
    loaded = FeatureSet.load(path)
    for name in ("prompts", "dialogue", "targets_packed", "embeddings", "valid_hw"):
        assert torch.equal(getattr(loaded, name), getattr(predicted, name))
    assert loaded.meta == {"source": "predicted"} and loaded.size == predicted.size
    both = FeatureSet.load(f"{path},{path}")
    assert len(both) == 2 * len(predicted) and both.num_dialogues == 2 * predicted.num_dialogues
    second = both.batch(torch.arange(len(predicted), 2 * len(predicted)))
    first = predicted.batch(torch.arange(len(predicted)))
    assert torch.equal(second.embeddings, first.embeddings) and torch.equal(second.targets, first.targets)
    train, held = predicted.split(1)
    assert held.num_dialogues == 1 and len(train) + len(held) == len(predicted)
    assert torch.equal(held.prompts, predicted.prompts[predicted.dialogue == predicted.num_dialogues - 1])
    assert torch.equal(held.batch([0]).embeddings, predicted.batch([len(train)]).embeddings)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        next(held.batches(len(held) + 1))
    epoch = list(itertools.islice(predicted.batches(4, seed=1), len(predicted) // 4))
    rows = [tuple(row) for b in epoch for row in b.prompts.tolist()]
    assert len(set(rows)) == len(rows) == 4 * (len(predicted) // 4)  # within an epoch no round comes twice
    with pytest.raises(ValueError, match="hold out"):
        predicted.split(predicted.num_dialogues)
    with pytest.raises(FileNotFoundError, match="no feature file"):
        FeatureSet.load(tmp_path / "missing.safetensors")


def _with_context_correction(model, seed):
    """A fresh context-aware residual JCM whose correction is not the identity."""
    use_residual_correction(model, context=True)
    torch.manual_seed(seed)
    for p in model.jcm.correction.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def test_cached_losses_equal_the_streaming_stage2(engine, samples):
    model = _with_context_correction(engine.model, 0)
    builder = PromptBuilder(engine.tokenizer, model.token_ids, model.config.chat_template,
                            model.config.vision.num_patches)
    features = collect_teacher(model, engine.tokenizer, samples, reference_noise=0.0, batch_size=2)
    batch = make_batch(samples, builder, model.config)
    with torch.no_grad():
        streaming = stage2_losses(model, batch, focus=True)
        cached_batch = features.batch(torch.arange(len(features)))
        cached = jcm_losses(model, cached_batch.embeddings, cached_batch.prompts, cached_batch.targets,
                            cached_batch.weight, focus=True)
    for name in ("loss", "judgment", "bce", "dice", "iou"):
        assert abs(float(streaming[name]) - float(cached[name])) < 2e-3, name


def test_batches_of_whole_dialogues_share_their_images(predicted):
    """Training batches hold whole dialogues with each image embedding once (the decoder prepares an image once
    for all its rounds); an epoch sees every dialogue once, and the shared batch is the per-round one."""
    epoch = predicted.num_dialogues  # at most one batch a dialogue
    seen = []
    for batch in itertools.islice(predicted.batches(2, seed=3, by_dialogue=True), epoch):
        assert batch.rows is not None and len(batch.prompts) >= 2
        assert len(batch.embeddings) == len(torch.unique(batch.rows)) == int(batch.rows.max()) + 1
        match = [(predicted.prompts == p).all(-1).nonzero().item() for p in batch.prompts]
        dialogues = predicted.dialogue[match]
        for d in torch.unique(dialogues).tolist():  # whole dialogues, in their rounds' order
            assert match_rows(predicted, d) == [m for m, x in zip(match, dialogues.tolist()) if x == d]
        per_round = predicted.batch(torch.tensor(match))
        assert torch.equal(batch.embeddings[batch.rows], per_round.embeddings)
        assert torch.equal(batch.targets, per_round.targets) and torch.equal(batch.weight, per_round.weight)
        seen += torch.unique(dialogues).tolist()
        if len(seen) == predicted.num_dialogues:
            break
    assert sorted(seen) == list(range(predicted.num_dialogues))


def match_rows(features, d):
    return (features.dialogue == d).nonzero().squeeze(-1).tolist()


def test_losses_with_shared_images_equal_per_round_images(engine, predicted):
    model = _with_context_correction(engine.model, 1)
    rows = torch.arange(len(predicted))
    per_round, shared = predicted.batch(rows), predicted.batch(rows, shared_images=True)
    assert len(shared.embeddings) == predicted.num_dialogues < len(rows)
    a = jcm_losses(model, per_round.embeddings, per_round.prompts, per_round.targets, per_round.weight)
    b = jcm_losses(model, shared.embeddings, shared.prompts, shared.targets, shared.weight, rows=shared.rows)
    for name in ("loss", "judgment", "bce", "dice", "iou"):
        assert abs(a[name].item() - b[name].item()) < 1e-4, name
    grads = []
    for out in (a, b):
        model.jcm.zero_grad()
        out["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.jcm.correction.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)


def test_cached_stage2_trains_and_its_loss_falls(tmp_path, predicted):
    path = predicted.save(tmp_path / "f.safetensors")
    engine = Engine.random_tiny(seed=4)  # the model the features came from
    engine.model.save_pretrained(tmp_path / "init", engine.tokenizer)
    out = run_training(tmp_path / "run", stage=2, steps=30, batch_size=8, init=str(tmp_path / "init"), lr=2e-3,
                       residual_correction=True, correction_context=True, correction_attention=True,
                       features=str(path), progress=False, save_every=30)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "stage2" / "log_stage2.csv")))
    assert len(rows) == 3 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    from MediRoundCore.model.modeling import MediRound

    trained, _ = MediRound.from_pretrained(out)
    assert trained.config.jcm.correction_attention
    base, _ = MediRound.from_pretrained(tmp_path / "init")
    trained_params = dict(trained.named_parameters())
    for name, p in base.named_parameters():  # stage 2 moved nothing outside the JCM
        if not name.startswith("jcm."):
            assert torch.equal(p, trained_params[name]), name
    with pytest.raises(ValueError, match="stage 2"):
        run_training(tmp_path / "bad", stage=1, steps=1, features=str(path))
    small = FeatureSet(predicted.prompts, predicted.dialogue, predicted.targets_packed, predicted.embeddings,
                       predicted.valid_hw, size=128)
    small.save(tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        run_training(tmp_path / "bad2", stage=2, steps=1, init=str(tmp_path / "init"),
                     features=str(tmp_path / "small.safetensors"))


def test_offline_jcm_scores_each_round(engine, predicted):
    model = engine.model
    use_residual_correction(model)  # an identity correction: JCM changes nothing at any β
    result = offline_jcm(model.eval(), predicted, batch_size=5)
    assert len(result.dice_raw) == len(predicted)
    for beta in (0.0, 0.5, 1.0):
        dice, share = result.at(beta)
        assert dice == pytest.approx(result.dice_raw.mean()) and share == float((result.scores <= beta).mean())
    # its Dice is the evaluator's Dice of the thresholded decode over the unpadded extent
    batch = predicted.batch([0])
    from MediRoundCore.model.modeling import upsample_logits

    with torch.no_grad():
        logits = upsample_logits(model, model.decode_with_prompts(batch.embeddings, batch.prompts))[0]
    h, w = predicted.valid_hw[predicted.dialogue[0]].tolist()
    counts = mask_counts((logits[:h, :w] > 0).numpy(), batch.targets[0, :h, :w].numpy().astype(bool))
    assert result.dice_raw[0] == pytest.approx(counts.dice, abs=1e-6)
    assert "| 0.6 |" in result.table()


@pytest.mark.parametrize("source", ["predicted", "teacher"])
def test_features_command_writes_a_loadable_file(tmp_path, source, capsys):
    from MediRoundCore.train.jcm_features import main

    out = tmp_path / f"{source}.safetensors"
    assert main(["--source", source, "--split", "train", "--start", "5", "--dialogues", "2", "--out", str(out)]) == 0
    features = FeatureSet.load(out)
    samples = list(itertools.islice(iter_training_samples(seed=0, split="train"), 5, 7))
    assert len(features) == sum(s.num_rounds for s in samples) and features.num_dialogues == 2
    assert features.meta["source"] == source and features.meta["start"] == 5
    assert f"{len(features)} rounds of 2 dialogues" in capsys.readouterr().out


def test_offline_report_compares_checkpoints(tmp_path, predicted):
    from MediRoundCore.evaluate.jcm_offline import main

    engine = Engine.random_tiny(seed=4)
    use_residual_correction(engine.model)
    engine.model.save_pretrained(tmp_path / "identity", engine.tokenizer)
    for p in engine.model.jcm.correction.fc3.parameters():  # a correction that moves every prompt
        torch.nn.init.normal_(p, std=0.5)
    engine.model.save_pretrained(tmp_path / "moved", engine.tokenizer)
    predicted.save(tmp_path / "f.safetensors")
    out = tmp_path / "report.md"
    assert main(["--checkpoint", str(tmp_path / "identity"), str(tmp_path / "moved"), "--features",
                 str(tmp_path / "f.safetensors"), "--out", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    rows = {name: [line for line in text.splitlines() if line.startswith(f"| {tmp_path / name} |")]
            for name in ("identity", "moved")}
    assert len(rows["identity"]) == len(rows["moved"]) == 1 and f"| {len(predicted)} |" in rows["identity"][0]
    cells = lambda row: row.split(" | ")[4:]  # noqa: E731  the Δ Dice cells
    assert all(c.startswith("+0.00") for c in cells(rows["identity"][0]))  # an identity correction changes no mask
    assert not cells(rows["moved"][0])[-1].startswith("+0.00")  # at β 1 every prompt moved


def test_mediround_train_takes_a_precision(tmp_path, predicted, monkeypatch):
    """`mediround train --precision bf16` runs the steps under bfloat16 autocast (float32 weights); a precision
    it does not know is a usage error."""
    from MediRoundCore import cli
    from MediRoundCore.train import trainer as trainer_module

    path = predicted.save(tmp_path / "f.safetensors")
    engine = Engine.random_tiny(seed=4)
    engine.model.save_pretrained(tmp_path / "init", engine.tokenizer)
    seen = []
    original = trainer_module.Trainer._losses

    def spy(self, batch):
        seen.append((self.cfg.precision, torch.is_autocast_enabled(self.accelerator.device.type)))
        return original(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "_losses", spy)
    code = cli.main(["train", "--out", str(tmp_path / "run"), "--stage", "2", "--init", str(tmp_path / "init"),
                     "--features", str(path), "--steps", "2", "--batch-size", "4", "--residual-correction",
                     "--precision", "bf16", "--save-every", "2"])
    assert code == 0 and seen == [("bf16", True)] * 2
    trained = torch.load(tmp_path / "run" / "stage2" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert trained["step"] == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--out", str(tmp_path / "x"), "--precision", "fp8"])
