"""load_full_model: the whole MediRound from LLaVA-Med + MedSAM (+ official checkpoint) files."""

import pytest
import torch

from fixtures_checkpoints import (llava_tensors, llava_tiny_config, medsam_tensors, official_tensors, small_config,
                                  write_base_tokenizer, write_clip_folder, write_llava_med)
from MediRoundCore.checkpoints._common import own_tensors
from MediRoundCore.checkpoints.full import load_full_model
from MediRoundCore.errors import CheckpointError

CORPUS = ["the liver is in the upper right abdomen", "segment the left kidney please", "where is the spleen?"] * 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    base = write_base_tokenizer(root / "llava-med", CORPUS, vocab_size=300)
    lt = llava_tensors(base)
    write_llava_med(root / "llava-med", lt, llava_tiny_config(base), shards=4)
    st = medsam_tensors()
    torch.save(st, root / "medsam_vit_b.pth")
    ot = official_tensors(base)
    torch.save(ot, root / "pytorch_model.bin")
    return root, base, lt, st, ot


def test_full_model_from_files(files):
    root, base, lt, st, ot = files
    model, tok = load_full_model(root / "llava-med", root / "medsam_vit_b.pth", base_config=small_config(8))
    # our four tokens follow the Mistral-like vocabulary; the config's vocabulary is the tokenizer's
    assert len(tok) == base + 4 and model.config.text.vocab_size == base + 4
    ids = model.token_ids
    assert sorted([ids.seg, ids.crop, ids.box, ids.image]) == list(range(base, base + 4))
    assert tok.convert_ids_to_tokens(ids.seg) == "[SEG]"
    own, _ = own_tensors(model)
    assert torch.equal(own["language_model.model.norm.weight"], lt["model.norm.weight"].float())
    assert torch.equal(own["segmenter.mask_decoder.iou_token.weight"], st["mask_decoder.iou_token.weight"])
    assert all(torch.isfinite(v).all() for v in own.values())
    assert any("freshly initialised" in n for n in model.checkpoint_report.notes)
    assert model.config.jcm.trained is False  # a fresh JCM is not applied
    with torch.no_grad():
        tokens = model.encode_image_tokens(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 16, 64)

    # with the official checkpoint: its heads and merged LoRA
    model2, _ = load_full_model(root / "llava-med", root / "medsam_vit_b.pth", mediround_ckpt=root / "pytorch_model.bin",
                                base_config=small_config(8))
    own2, _ = own_tensors(model2)
    assert model2.config.jcm.trained is True
    P = "base_model.model."
    assert torch.equal(own2["seg_projection.2.weight"], ot[P + "model.text_hidden_fcs.0.2.weight"])
    assert torch.equal(own2["jcm.correction.fc3.bias"], ot[P + "model.refine_MLP.fc3.bias"])
    assert torch.equal(own2["language_model.model.embed_tokens.weight"][ids.seg], ot[P + "model.embed_tokens.weight"][base])


def test_bfloat16_and_clip_dir(files, tmp_path):
    root, base, lt, _, _ = files
    clip = write_clip_folder(tmp_path / "clip", {k: v * 3 for k, v in lt.items() if "vision_tower" in k})
    model, _ = load_full_model(root / "llava-med", root / "medsam_vit_b.pth", clip_dir=clip, dtype=torch.bfloat16,
                               base_config=small_config(8))
    assert model.dtype == torch.bfloat16
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    own, _ = own_tensors(model)
    key = "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"
    ours = [v for k, v in own.items() if k.endswith("post_layernorm.weight") and k.startswith("vision_tower.")][0]
    assert torch.equal(ours, (lt[key] * 3).to(torch.bfloat16))
    assert torch.get_default_dtype() == torch.float32


def test_errors(files, tmp_path):
    root, *_ = files
    with pytest.raises(CheckpointError, match="not found"):
        load_full_model(tmp_path / "none", root / "medsam_vit_b.pth", base_config=small_config(8))
    with pytest.raises(CheckpointError, match="not found"):
        load_full_model(root / "llava-med", tmp_path / "none.pth", base_config=small_config(8))
