"""Shipped lite weights store the word embeddings (half of lite's weights, also its tied output head) as their
int8 change from MiniLM's: a real lite model round-trips through save_pretrained/from_pretrained within the
rounding, the file shrinks, and a file whose base is missing, unknown or mis-described is a clear error."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from MediRoundCore.checkpoints import base_delta
from MediRoundCore.checkpoints.ours import AGAINST_BASES
from MediRoundCore.errors import CheckpointError
from MediRoundCore.model.modeling import MediRound
from conftest import build_lite_or_skip

KEY = "language_model.model.embed_tokens.weight"


@pytest.fixture(scope="module")
def trained_lite():
    model, tokenizer = build_lite_or_skip()
    torch.manual_seed(0)
    with torch.no_grad():  # as training moves them: a little, every row
        model.language_model.get_input_embeddings().weight.add_(0.01 * torch.randn_like(
            model.language_model.get_input_embeddings().weight))
    return model.eval(), tokenizer


def test_lite_round_trip_against_minilm(trained_lite, tmp_path):
    model, tokenizer = trained_lite
    model.save_pretrained(tmp_path / "plain", tokenizer, storage_dtype=torch.float16)
    model.save_pretrained(tmp_path / "delta", tokenizer, storage_dtype=torch.float16, against_bases=True)
    path = tmp_path / "delta" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()[AGAINST_BASES]) == {KEY: "lite_word_embeddings"}
        assert f.get_tensor(KEY + base_delta.DELTA).dtype == torch.int8 and KEY not in f.keys()
        assert f.get_tensor(KEY + base_delta.SCALE).dtype == torch.float32  # not cast with the rest
    plain_size, delta_size = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("plain", "delta"))
    assert delta_size < 0.8 * plain_size  # measured 0.74 on lite (the table is half of its weights)
    loaded, _ = MediRound.from_pretrained(tmp_path / "delta")
    words = model.language_model.get_input_embeddings().weight.detach()
    got = loaded.language_model.get_input_embeddings().weight.detach()
    start = base_delta.lite_word_embeddings(tuple(words.shape))
    step = (words - start).abs().amax(dim=1, keepdim=True) / 127.0  # the int8 grid of each row
    assert bool(((got - words).abs() <= step / 2 + 1e-6).all())
    assert loaded.language_model.lm_head.weight is loaded.language_model.get_input_embeddings().weight  # tied
    plain, _ = MediRound.from_pretrained(tmp_path / "plain")
    for key, value in plain.state_dict().items():  # everything else as the float16 save has it
        if key not in (KEY, "language_model.lm_head.weight"):
            assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_unknown_or_malformed_base_is_a_clear_error(trained_lite, tmp_path, monkeypatch):
    model, tokenizer = trained_lite
    model.save_pretrained(tmp_path, tokenizer, storage_dtype=torch.float16, against_bases=True)
    path = tmp_path / "model.safetensors"
    monkeypatch.setitem(base_delta.BASES, "lite_word_embeddings", (KEY, lambda shape: None))
    with pytest.raises(CheckpointError, match="not available here"):
        MediRound.from_pretrained(tmp_path)
    monkeypatch.undo()
    tensors = load_file(str(path))
    for metadata, message in (({AGAINST_BASES: json.dumps({KEY: "a base we never had"})}, "unknown"),
                              ({AGAINST_BASES: "[1, 2]"}, "not a map"),
                              ({}, KEY)):  # no metadata: the rows alone do not make the table
        save_file(tensors, str(path), metadata={"format": "pt", **metadata})
        with pytest.raises(CheckpointError, match=message):
            MediRound.from_pretrained(tmp_path)
    against = {AGAINST_BASES: json.dumps({KEY: "lite_word_embeddings"})}
    scale = tensors[KEY + base_delta.SCALE]
    for broken in ({KEY + base_delta.SCALE: scale[:5]}, {KEY + base_delta.SCALE: scale[:, 0].contiguous()},
                   {KEY + base_delta.DELTA: tensors[KEY + base_delta.DELTA].float()}):
        save_file({**tensors, **broken}, str(path), metadata={"format": "pt", **against})
        with pytest.raises(CheckpointError, match="one floating scale per row"):
            MediRound.from_pretrained(tmp_path)


def test_a_snapshot_restores_to_a_model_folder(trained_lite, tmp_path):
    """`train.snapshot restore`: a committed lite snapshot (float16, int8 word-embedding deltas) becomes a model
    folder again (on a fresh clone the run's checkpoint is gone), with the snapshot's weights and config."""
    from MediRoundCore.train.snapshot import main as snapshot_main, restore_snapshot, save_snapshot
    from MediRoundCore.train.trainer import STATE_FILE

    model, tokenizer = trained_lite
    model.save_pretrained(tmp_path / "run", tokenizer)
    torch.save({"optimizer": {}, "scheduler": {}, "step": 42}, tmp_path / "run" / STATE_FILE)
    save_snapshot(tmp_path / "run", tmp_path / "snap")
    assert restore_snapshot(tmp_path / "snap", tmp_path / "model") == 42
    restored, _ = MediRound.from_pretrained(tmp_path / "model")
    assert restored.config.to_dict() == model.config.to_dict()
    words = model.language_model.get_input_embeddings().weight.detach()
    step = (words - base_delta.lite_word_embeddings(tuple(words.shape))).abs().amax(dim=1, keepdim=True) / 127.0
    assert bool(((restored.language_model.get_input_embeddings().weight - words).abs() <= step / 2 + 1e-6).all())
    theirs = restored.state_dict()
    for key, value in model.state_dict().items():  # the rest: as float16 keeps it
        if key not in (KEY, "language_model.lm_head.weight") and value.is_floating_point():
            torch.testing.assert_close(theirs[key], value, rtol=1e-3, atol=1e-4, msg=key)
    (tmp_path / "snap" / "config.json").write_text(json.dumps({**model.config.to_dict(), "size": "tiny"}))
    assert snapshot_main(["restore", str(tmp_path / "snap"), str(tmp_path / "other")]) == 1  # a message
    assert not (tmp_path / "other").exists()
