"""MedSAM medsam_vit_b.pth (a SAM ViT-B state dict) into our segmenter; unsafe pickles are refused."""

import pickle

import pytest
import torch

from fixtures_checkpoints import CreatesFile, medsam_tensors, tiny_model
from MediRoundCore.checkpoints._common import own_tensors
from MediRoundCore.checkpoints.medsam import load_medsam
from MediRoundCore.errors import CheckpointError

BASE = 96


@pytest.fixture(scope="module")
def medsam(tmp_path_factory):
    tensors = medsam_tensors()
    path = tmp_path_factory.mktemp("medsam") / "medsam_vit_b.pth"
    torch.save(tensors, path)
    return path, tensors


def test_values_land(medsam):
    path, tensors = medsam
    model = tiny_model(BASE)
    report = load_medsam(path, model)
    own, _ = own_tensors(model)
    for key, value in tensors.items():
        assert torch.equal(own["segmenter." + key], value), key
    assert sorted(report.loaded) == sorted(k for k in own if k.startswith("segmenter."))
    # and the decoder runs with them
    emb = torch.randn(1, 256, 8, 8)
    prompt = torch.randn(1, 256)
    with torch.no_grad():
        ours = model.decode_with_prompts(emb, prompt)
    assert ours.shape == (1, 1, 32, 32) and torch.isfinite(ours).all()


def test_pixel_stats_ignored_and_errors(medsam, tmp_path):
    _, tensors = medsam
    model = tiny_model(BASE)
    with_stats = dict(tensors, pixel_mean=torch.zeros(3, 1, 1), pixel_std=torch.ones(3, 1, 1))
    torch.save(with_stats, tmp_path / "stats.pth")
    assert "pixel_mean" in load_medsam(tmp_path / "stats.pth", model).ignored

    missing = {k: v for k, v in tensors.items() if k != "mask_decoder.iou_token.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.pth: missing key 'mask_decoder\.iou_token\.weight'"):
        load_medsam(tmp_path / "missing.pth", model)

    extra = dict(tensors, **{"mask_decoder.extra_head.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'mask_decoder\.extra_head\.weight'"):
        load_medsam(tmp_path / "extra.pth", model)

    bad = dict(tensors, **{"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)})
    torch.save(bad, tmp_path / "vit_h_like.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'image_encoder\.pos_embed'.*\(1, 64, 64, 768\)"):
        load_medsam(tmp_path / "vit_h_like.pth", model)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_with_code_is_refused(tmp_path, protocol):
    victim = tmp_path / "pwned.txt"
    payload = {"image_encoder.pos_embed": torch.zeros(1), "trap": CreatesFile(victim)}
    path = tmp_path / "medsam_vit_b.pth"
    torch.save(payload, path, pickle_protocol=protocol)
    assert not victim.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_medsam(path, tiny_model(BASE))
    assert not victim.exists(), "loading ran code from the pickle"
    # a legacy (non-zip) pickle is refused the same way
    legacy = tmp_path / "legacy.pth"
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused"):
        load_medsam(legacy, tiny_model(BASE))
    assert not victim.exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_medsam(tmp_path / "junk.pth", tiny_model(BASE))
    with pytest.raises(CheckpointError, match="not found"):
        load_medsam(tmp_path / "absent.pth", tiny_model(BASE))
