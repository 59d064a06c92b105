"""LLaVA-Med v1.5 (original llava_mistral layout, sharded safetensors) into a small MediRound."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_checkpoints import (llava_tensors, llava_tiny_config, tiny_model, write_clip_folder, write_llava_med)
from MediRoundCore.checkpoints._common import own_tensors, vision_prefix
from MediRoundCore.checkpoints.llava_med import load_llava_med
from MediRoundCore.errors import CheckpointError

BASE = 96


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    tensors = llava_tensors(BASE)
    folder = write_llava_med(tmp_path_factory.mktemp("llava") / "llava-med", tensors, llava_tiny_config(BASE))
    return folder, tensors


def ours_for(key, own):
    """Our key for a LLaVA-Med key (written out independently of the loader's own mapping)."""
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return vision_prefix(own) + key[len("model.vision_tower.vision_tower.vision_model."):]
    if key.startswith("model.mm_projector."):
        return key[len("model."):]
    return "language_model." + key


def test_values_land(llava):
    folder, tensors = llava
    model = tiny_model(BASE)
    report = load_llava_med(folder, model)
    own, _ = own_tensors(model)
    assert len(list(folder.glob("model-0000*-of-00003.safetensors"))) == 3
    for key, value in tensors.items():
        ours = own[ours_for(key, own)]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours[:BASE], value.float())
            mean = value.float().mean(0)
            for row in range(BASE, BASE + 4):  # [SEG], <crop>, <box>, <image>: new rows = mean of old rows
                assert torch.allclose(ours[row], mean, atol=1e-6)
        else:
            assert torch.equal(ours, value.float()), key
    assert report.ignored == {}
    assert any("new" in n for n in report.notes)
    # every tensor of the three parts came from the file
    parts = [k for k in own if k.startswith(("language_model.", "mm_projector.", "vision_tower."))]
    assert sorted(report.loaded) == sorted(parts)


def test_vision_tower_from_clip_folder(llava, tmp_path):
    folder, tensors = llava
    # a LLaVA-Med folder without the vision tower in its shards, plus a CLIPModel .bin folder
    text_only = {k: v for k, v in tensors.items() if "vision_tower" not in k}
    bare = write_llava_med(tmp_path / "bare", text_only, llava_tiny_config(BASE), shards=2)
    model = tiny_model(BASE)
    with pytest.raises(CheckpointError, match=r"model\.vision_tower\.vision_tower\.vision_model\..*clip_dir"):
        load_llava_med(bare, model)
    clip_tensors = {k: v * 2 for k, v in tensors.items() if "vision_tower" in k}
    clip = write_clip_folder(tmp_path / "clip", clip_tensors)
    report = load_llava_med(bare, model, clip_dir=clip)
    own, _ = own_tensors(model)
    key = "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"
    assert torch.equal(own[ours_for(key, own)], clip_tensors[key].float())
    assert "text_model.embeddings.token_embedding.weight" in report.ignored
    assert "logit_scale" in report.ignored
    # with both present, clip_dir wins (as the public code's delay_load does) and the shard copy is ignored
    model2 = tiny_model(BASE)
    report2 = load_llava_med(folder, model2, clip_dir=write_clip_folder(tmp_path / "clip2", clip_tensors, as_bin=False))
    own2, _ = own_tensors(model2)
    assert torch.equal(own2[ours_for(key, own2)], clip_tensors[key].float())
    assert key in report2.ignored


def _edit_shard(folder, edit):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.norm.weight"]
    state = load_file(str(shard))
    edit(state, index)
    save_file(state, str(shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_unexpected_shape(llava, tmp_path):
    folder, _ = llava

    def variant(name, edit):
        target = tmp_path / name
        shutil.copytree(folder, target)
        _edit_shard(target, edit)
        return target

    def drop(state, index):
        del state["model.norm.weight"]
        del index["weight_map"]["model.norm.weight"]

    def extra(state, index):
        state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
        index["weight_map"]["model.layers.0.self_attn.extra_proj.weight"] = index["weight_map"]["model.norm.weight"]

    def reshape(state, index):
        state["model.norm.weight"] = torch.zeros(65)

    model = tiny_model(BASE)
    before = own_tensors(model)[0]["language_model.model.layers.0.mlp.up_proj.weight"].clone()
    with pytest.raises(CheckpointError, match=r"missing key 'model\.norm\.weight'"):
        load_llava_med(variant("missing", drop), model)
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.0\.self_attn\.extra_proj\.weight'"):
        load_llava_med(variant("extra", extra), model)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model\.norm\.weight'.*\(65,\)"):
        load_llava_med(variant("shape", reshape), model)
    # nothing was written by the failed loads
    assert torch.equal(own_tensors(model)[0]["language_model.model.layers.0.mlp.up_proj.weight"], before)


def test_config_checks(llava, tmp_path):
    folder, _ = llava
    target = tmp_path / "linear"
    shutil.copytree(folder, target)
    cfg = json.loads((target / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mm_projector_type"):
        load_llava_med(target, tiny_model(BASE))
    with pytest.raises(CheckpointError, match="not found"):
        load_llava_med(tmp_path / "nowhere", tiny_model(BASE))


def test_tokens_inside_old_vocabulary_refused(llava):
    folder, _ = llava
    from MediRoundCore.model.modeling import MediRound
    from MediRoundCore.model.tokenizer import TokenIds
    from fixtures_checkpoints import small_config

    ids = TokenIds(seg=5, crop=6, box=7, image=8, bos=1, eos=2, pad=0)
    model = MediRound(small_config(BASE + 4), ids)
    with pytest.raises(CheckpointError, match="inside the checkpoint's vocabulary"):
        load_llava_med(folder, model)
