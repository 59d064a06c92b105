"""The full MediRound from real weights: LLaVA-Med v1.5 + MedSAM ViT-B (+ an official MediRound checkpoint).

    model, tokenizer = load_full_model("llava-med-v1.5-mistral-7b/", "medsam_vit_b.pth",
                                       mediround_ckpt="ckpt_model/pytorch_model.bin",
                                       clip_dir="clip-vit-large-patch14-336/", dtype=torch.bfloat16)

Order: LLaVA-Med (decoder, projector, vision tower: from clip_dir when given, else from the LLaVA-Med
shards), then MedSAM (segmenter), then the official checkpoint, which overrides what it carries and merges its
LoRA. Without an official checkpoint the MediRound heads (box_encoder, seg_projection, jcm) keep their fresh
initialisation: such a model is a starting point for training, not a working segmenter.

Memory: the model is built directly in `dtype` with transformers' `no_init_weights` (no random init of the 7B
weights that the loaders overwrite at once), and tensors are copied one at a time from lazily opened
safetensors shards, so the peak is about one model in `dtype` plus one tensor (plus the MedSAM / official
files, which `torch.load` reads whole).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ._common import LoadReport
from .llava_med import check_llava_config, load_llava_med, read_llava_config
from .medsam import load_medsam
from .official import load_official


def config_from_llava(llava_config: dict, vocab_size: int, base=None, clip_config: dict | None = None):
    """Our config: `base` (default `full_config()`) with the text sizes of LLaVA-Med's config.json, the vision
    sizes of the CLIP folder's config.json (when given) and the vocabulary of our extended tokenizer."""
    from ..model.config import full_config

    base = base or full_config()
    text_fields = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                   "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
                   "num_key_value_heads": "num_key_value_heads", "max_position_embeddings": "max_position_embeddings",
                   "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps", "sliding_window": "sliding_window"}
    text = dataclasses.replace(base.text, vocab_size=vocab_size,
                               **{ours: llava_config[theirs] for ours, theirs in text_fields.items()
                                  if theirs in llava_config})
    vision = base.vision
    if clip_config:
        vc = clip_config.get("vision_config", clip_config)
        vision = dataclasses.replace(vision, **{k: vc[k] for k in ("hidden_size", "intermediate_size",
                                                                    "num_hidden_layers", "num_attention_heads",
                                                                    "image_size", "patch_size") if k in vc})
    if "mm_vision_select_layer" in llava_config:
        vision = dataclasses.replace(vision, select_layer=llava_config["mm_vision_select_layer"])
    return dataclasses.replace(base, text=text, vision=vision)


def _build(config, ids, dtype):
    from transformers.initialization import no_init_weights

    from ..model.modeling import MediRound

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = MediRound(config, ids)
    finally:
        torch.set_default_dtype(previous)
    # The heads no external checkpoint may cover get a proper initialisation (no_init_weights left them empty).
    for module in (model.box_encoder, model.seg_projection, model.jcm):
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    return model


def load_full_model(llava_med_dir, medsam_path, mediround_ckpt=None, clip_dir=None, dtype=torch.float32,
                    device="cpu", base_config=None, lora: str = "merge"):
    """(model, tokenizer) of the full MediRound from local files only; `model.checkpoint_report` lists what was
    loaded and ignored. `base_config` (default `full_config()`) supplies what the files do not (segmenter sizes,
    normalisation, chat template, JCM β)."""
    from ..model.tokenizer import TokenIds, load_tokenizer

    llava_dir = Path(llava_med_dir)
    if not llava_dir.is_dir():
        raise CheckpointError(f"{llava_dir}: LLaVA-Med folder not found")
    llava_config = read_llava_config(llava_dir)
    tokenizer = load_tokenizer(llava_dir)  # adds [SEG], <crop>, <box>, <image> after the Mistral vocabulary
    clip_config = None
    if clip_dir is not None and (Path(clip_dir) / "config.json").is_file():
        try:
            clip_config = json.loads((Path(clip_dir) / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{Path(clip_dir) / 'config.json'}: not valid JSON ({exc})") from None
    config = config_from_llava(llava_config, len(tokenizer), base_config, clip_config)
    ids = TokenIds.from_tokenizer(tokenizer)
    base_vocab = llava_config.get("vocab_size")
    if base_vocab is not None and min(ids.seg, ids.crop, ids.box, ids.image) < base_vocab:
        raise CheckpointError(f"{llava_dir}: the tokenizer already has our tokens inside LLaVA-Med's vocabulary "
                              f"({base_vocab}); expected the plain Mistral tokenizer")
    model = _build(config, ids, dtype)
    check_llava_config(llava_config, model, str(llava_dir / "config.json"))
    report = LoadReport(source=str(llava_dir))
    report.merge(load_llava_med(llava_dir, model, clip_dir=clip_dir))
    report.merge(load_medsam(medsam_path, model))
    if mediround_ckpt is not None:
        report.merge(load_official(mediround_ckpt, model, lora=lora))
    else:
        report.notes.append("no MediRound checkpoint: box_encoder, seg_projection and jcm are freshly initialised "
                            "(the JCM is not applied)")
        model.config.jcm.trained = False
    model.to(device=device).eval()
    model.checkpoint_report = report
    return model, tokenizer
