"""Fixtures for the checkpoint-loader tests: real files in the real external layouts, at tiny widths.

The key lists come from the committed manifests (`MediRoundCore/checkpoints/manifests/*.json`); `shrink`
turns each full-size shape into the tiny one with a size map (per key pattern: full value → tiny value) and a
layer map (which full-size layers the tiny model keeps, renumbered). Nothing here knows our own key names:
the loaders under test must find their way from the external names alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from MediRoundCore.checkpoints._common import load_manifest
from MediRoundCore.model.config import MediRoundConfig, SegmenterConfig, TextConfig, VisionConfig
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.model.tokenizer import TokenIds

# Our own small sizes (independent of the shipped tiny preset, which may change): Mistral hidden 64,
# intermediate 128, 2 layers, 4 heads / 2 kv heads (kv dim 32); CLIP 32/64, 2 layers, 64 px / 16 → 17
# positions; SAM embed 32, 4 blocks (global 1, 3), 2 heads (head dim 16), 128 px / 16 → 8² grid, window 4.
LM_LAYERS, VISION_LAYERS = 2, 2
SAM_BLOCKS = {0: 0, 2: 1, 3: 2, 5: 3}  # full block → small block (window, global, window, global)


def small_config(vocab_size: int) -> MediRoundConfig:
    return MediRoundConfig(
        size="tiny",
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=LM_LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10_000.0),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS,
                            num_attention_heads=2, image_size=64, patch_size=16),
        segmenter=SegmenterConfig(image_size=128, patch_size=16, embed_dim=32, depth=4, num_heads=2,
                                  global_attn_indexes=(1, 3), window_size=4, decoder_mlp_dim=64),
    )


def size_rules(base_vocab: int) -> list[tuple[str, dict[int, int]]]:
    """(key pattern, {full size: tiny size}); the first pattern that matches a key applies."""
    return [
        (r"vision_tower|^vision_model\.", {1024: 32, 4096: 64, 577: 17, 14: 16}),
        (r"mm_projector", {1024: 32, 4096: 64}),
        (r"attn\.rel_pos_[hw]$", {127: 15, 27: 7, 64: 16}),
        (r"image_encoder\.pos_embed$", {64: 8, 768: 32}),
        (r"image_encoder\.", {768: 32, 3072: 128, 2304: 96}),
        (r"mask_decoder\.transformer\.layers\.\d+\.mlp\.", {2048: 64}),
        (r"prompt_encoder\.|mask_decoder\.|mask_quality_MLP|refine_MLP", {}),
        (r"text_hidden_fcs|bbox_encoder", {4096: 64}),
        (r".", {4096: 64, 14336: 128, 1024: 32, 32000: base_vocab, 32003: base_vocab + 3}),
    ]


LAYER_RULES = [
    (r"(vision_tower\.vision_model\.encoder\.layers\.|^vision_model\.encoder\.layers\.)(\d+)\.",
     {i: i for i in range(VISION_LAYERS)}),
    (r"(image_encoder\.blocks\.)(\d+)\.", SAM_BLOCKS),
    (r"(model\.layers\.)(\d+)\.", {i: i for i in range(LM_LAYERS)}),
]


def shrink(keys: dict[str, list[int]], base_vocab: int) -> dict[str, tuple[int, ...]]:
    """Full-size manifest keys → tiny keys and shapes (layers the tiny model lacks are dropped)."""
    rules = size_rules(base_vocab)
    out = {}
    for key, shape in keys.items():
        for pattern, layers in LAYER_RULES:
            m = re.search(pattern, key)
            if m:
                index = int(m.group(2))
                if index not in layers:
                    key = None
                else:
                    key = key[: m.start(2)] + str(layers[index]) + key[m.end(2):]
                break
        if key is None:
            continue
        sizes = next(v for p, v in rules if re.search(p, key))
        out[key] = tuple(sizes.get(d, d) for d in shape)
    return out


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * 0.05).to(dtype) for k, s in shapes.items()}


def tiny_model(base_vocab: int) -> MediRound:
    """Small MediRound whose 4 new tokens follow a base vocabulary of `base_vocab` (as ours follow Mistral's)."""
    ids = TokenIds(seg=base_vocab, crop=base_vocab + 1, box=base_vocab + 2, image=base_vocab + 3, bos=1, eos=2, pad=0)
    torch.manual_seed(0)
    return MediRound(small_config(base_vocab + 4), ids).eval()


# -- LLaVA-Med ---------------------------------------------------------------------------------------
def llava_tiny_config(base_vocab: int) -> dict:
    cfg = dict(load_manifest("llava_med_v15_mistral")["config"])
    t = small_config(base_vocab + 4)
    cfg.update(hidden_size=t.text.hidden_size, intermediate_size=t.text.intermediate_size,
               num_hidden_layers=t.text.num_hidden_layers, num_attention_heads=t.text.num_attention_heads,
               num_key_value_heads=t.text.num_key_value_heads, vocab_size=base_vocab,
               max_position_embeddings=t.text.max_position_embeddings, rope_theta=t.text.rope_theta,
               mm_hidden_size=t.vision.hidden_size, mm_vision_tower="clip-tiny")
    return cfg


def llava_tensors(base_vocab: int, seed: int = 1, vision: bool = True) -> dict[str, torch.Tensor]:
    shapes = shrink(load_manifest("llava_med_v15_mistral")["keys"], base_vocab)
    if not vision:
        shapes = {k: v for k, v in shapes.items() if "vision_tower" not in k}
    return random_tensors(shapes, seed, torch.bfloat16)


def write_llava_med(folder: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 3) -> Path:
    """HF sharded layout: model-0000i-of-0000N.safetensors + model.safetensors.index.json + config.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_clip_folder(folder: Path, vision: dict[str, torch.Tensor], as_bin: bool = True) -> Path:
    """A HF CLIPModel folder: `vision_model.*` from the LLaVA-Med vision keys, plus text-side tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "model.vision_tower.vision_tower."
    state = {k[len(prefix):]: v.float() for k, v in vision.items() if k.startswith(prefix)}
    state.update({"text_model.embeddings.token_embedding.weight": torch.randn(10, 8),
                  "text_model.final_layer_norm.weight": torch.ones(8), "visual_projection.weight": torch.randn(8, 32),
                  "text_projection.weight": torch.randn(8, 8), "logit_scale": torch.tensor(2.0),
                  "vision_model.embeddings.position_ids": torch.arange(17).unsqueeze(0)})
    if as_bin:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": VISION_LAYERS, "num_attention_heads": 2,
        "image_size": 64, "patch_size": 16}}))
    return folder


def write_base_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 300):
    """A tokenizer without our tokens (as Mistral's lacks them); returns its length (the base vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return len(tok)


# -- MedSAM / official -------------------------------------------------------------------------------
def medsam_tensors(seed: int = 2) -> dict[str, torch.Tensor]:
    return random_tensors(shrink(load_manifest("medsam_vit_b")["keys"], 0), seed)


def official_tensors(base_vocab: int, seed: int = 3, base_layer: bool = False) -> dict[str, torch.Tensor]:
    """Consolidated state dict of the peft-wrapped official model (peft 0.4 names, or ≥ 0.7 with base_layer)."""
    tensors = random_tensors(shrink(load_manifest("mediround_official")["keys"], base_vocab), seed)
    if base_layer:
        tensors = {re.sub(r"\.(q_proj|v_proj)\.weight$", r".\1.base_layer.weight", k): v for k, v in tensors.items()}
    return tensors


class CreatesFile:
    """Pickled, this would create a file when loaded; weights-only loading must refuse it before it runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
