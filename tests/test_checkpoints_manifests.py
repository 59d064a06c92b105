"""The committed key manifests match the external layouts our loaders expect, at full size."""

import pytest

from MediRoundCore.checkpoints import _manifests
from MediRoundCore.checkpoints._common import load_manifest

NAMES = {"llava_med_v15_mistral": _manifests.llava_med_manifest, "medsam_vit_b": _manifests.medsam_manifest,
         "mediround_official": _manifests.official_manifest, "lite_medsam": _manifests.lite_medsam_manifest}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_manifest_is_current(name):
    committed = load_manifest(name)
    assert committed == NAMES[name](), f"regenerate with python -m MediRoundCore.checkpoints._manifests ({name})"
    assert committed["key_count"] == len(committed["keys"])
    assert committed["source"]


def test_manifest_contents():
    llava = load_manifest("llava_med_v15_mistral")["keys"]
    assert llava["model.embed_tokens.weight"] == [32000, 4096]
    assert llava["lm_head.weight"] == [32000, 4096]
    assert llava["model.layers.31.self_attn.k_proj.weight"] == [1024, 4096]
    assert llava["model.layers.31.mlp.gate_proj.weight"] == [14336, 4096]
    assert llava["model.mm_projector.0.weight"] == [4096, 1024]
    assert llava["model.mm_projector.2.weight"] == [4096, 4096]
    assert llava["model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"] == [577, 1024]
    assert llava["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"] == [1024, 3, 14, 14]
    assert sum(k.startswith("model.layers.") for k in llava) == 32 * 9
    assert sum(".encoder.layers." in k for k in llava) == 24 * 16
    assert len(llava) == 686

    sam = load_manifest("medsam_vit_b")["keys"]
    assert sam["image_encoder.pos_embed"] == [1, 64, 64, 768]
    assert sam["image_encoder.blocks.2.attn.rel_pos_h"] == [127, 64]  # global block
    assert sam["image_encoder.blocks.0.attn.rel_pos_h"] == [27, 64]  # 14×14 window
    assert sam["mask_decoder.transformer.layers.0.mlp.lin1.weight"] == [2048, 256]
    assert sam["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == [2, 128]
    assert all(k.split(".")[0] in ("image_encoder", "prompt_encoder", "mask_decoder") for k in sam)
    assert len(sam) == 314

    off = load_manifest("mediround_official")["keys"]
    p = "base_model.model."
    assert off[p + "model.embed_tokens.weight"] == [32003, 4096]
    assert off[p + "lm_head.weight"] == [32003, 4096]
    assert off[p + "model.layers.0.self_attn.q_proj.lora_A.default.weight"] == [8, 4096]
    assert off[p + "model.layers.0.self_attn.v_proj.lora_B.default.weight"] == [1024, 8]
    assert off[p + "model.text_hidden_fcs.0.2.weight"] == [256, 4096]
    assert off[p + "model.bbox_encoder.weight"] == [4096, 4]
    assert off[p + "model.mask_quality_MLP.fc3.weight"] == [1, 512]
    assert off[p + "model.refine_MLP.fc3.weight"] == [256, 512]
    assert off[p + "model.visual_model.image_encoder.pos_embed"] == [1, 64, 64, 768]
    assert sum(".lora_" in k for k in off) == 32 * 2 * 2
    assert all(k.startswith(p) for k in off)
    assert len(off) == 686 + 314 + 4 + 2 + 12 + 128
