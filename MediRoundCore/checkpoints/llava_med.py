"""LLaVA-Med v1.5 (Mistral-7B) in its original `llava_mistral` layout → our language model, projector and
vision tower.

The folder (as released, e.g. microsoft/llava-med-v1.5-mistral-7b) holds `config.json` (model_type
`llava_mistral`), `model.safetensors.index.json` and shards `model-0000X-of-0000Y.safetensors`, with keys:

  model.embed_tokens.weight, model.layers.N.…, model.norm.weight, lm_head.weight   → language_model.*
  model.mm_projector.{0,2}.{weight,bias}                                          → mm_projector.*
  model.vision_tower.vision_tower.vision_model.…  (CLIP ViT-L/14-336)             → vision_tower.*

The released shards do carry the vision tower (LLaVA-Med issue #105: "Some weights … were not used:
model.vision_tower.vision_tower…"), but the public LLaVA-Med and MediRound code never reads them: it builds
the tower with `delay_load=True` from `mm_vision_tower` (`openai/clip-vit-large-patch14-336`). So when
`clip_dir` (a local CLIP folder in HF layout: `vision_model.*` keys, a full CLIPModel or a CLIPVisionModel)
is given, the tower comes from there, as the public code does, and the copy in the shards is ignored; without
`clip_dir` the copy in the shards is used.

Vocabulary: rows 0…V-1 (V = LLaVA-Med's vocab_size, 32000) of embed_tokens and lm_head are copied as they
are; our new tokens (`[SEG]`, `<crop>`, `<box>`, `<image>`, ids ≥ V) get new rows, initialised to the mean
of the existing rows (embed and lm_head alike), the usual choice when a vocabulary grows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ._common import (DictSource, Entry, LoadReport, TensorSource, check_consumed, execute,
                      open_sharded_folder, own_tensors, vision_prefix)
from .safety import load_tensors

LLAVA_VISION = "model.vision_tower.vision_tower.vision_model."
IGNORE = [
    (r"rotary_emb\.inv_freq$", "rotary frequencies are recomputed from the config"),
    (r"position_ids$", "CLIP position ids are a constant buffer"),
]
CLIP_IGNORE = IGNORE + [
    (r"^text_model\.", "CLIP text encoder: not used by LLaVA"),
    (r"^(visual_projection|text_projection)\.", "CLIP contrastive projections: LLaVA uses hidden states"),
    (r"^logit_scale$", "CLIP contrastive temperature: not used by LLaVA"),
]
EMBEDDING_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def read_llava_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a LLaVA-Med folder?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def check_llava_config(data: dict, model, path: str) -> None:
    """Fields of LLaVA-Med's config.json that must agree with our model (sizes are checked per tensor)."""
    if data.get("model_type", "llava_mistral") != "llava_mistral":
        raise CheckpointError(f"{path}: model_type is {data.get('model_type')!r}, expected 'llava_mistral'")
    projector = data.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(f"{path}: mm_projector_type is {projector!r}; MediRound uses 'mlp2x_gelu'")
    select = data.get("mm_vision_select_layer", -2)
    if select != model.config.vision.select_layer:
        raise CheckpointError(f"{path}: mm_vision_select_layer is {select}, our config has "
                              f"{model.config.vision.select_layer}")
    feature = data.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise CheckpointError(f"{path}: mm_vision_select_feature is {feature!r}; MediRound uses 'patch'")
    if "mm_hidden_size" in data and data["mm_hidden_size"] != model.config.vision.hidden_size:
        raise CheckpointError(f"{path}: mm_hidden_size is {data['mm_hidden_size']}, our vision tower has "
                              f"{model.config.vision.hidden_size}")


def language_keymap(own) -> dict[str, str]:
    """LLaVA-Med key → our key for the Mistral decoder (identical names under `language_model.`)."""
    return {k[len("language_model."):]: k for k in own if k.startswith("language_model.")}


def projector_keymap(own) -> dict[str, str]:
    return {"model." + k: k for k in own if k.startswith("mm_projector.")}


def vision_keymap(own, source_prefix: str) -> dict[str, str]:
    prefix = vision_prefix(own)
    return {source_prefix + k[len(prefix):]: k for k in own if k.startswith(prefix)}


def embedding_entries(target: str, source_key: str, source: TensorSource, own, model) -> tuple[Entry, int]:
    """Copy the source vocabulary's rows; our rows beyond it are new (filled afterwards)."""
    n_src, n_own = source.shape(source_key)[0], own[target].shape[0]
    if n_src > n_own:
        raise CheckpointError(f"{source.where(source_key)}: {source_key!r} has {n_src} rows but our vocabulary "
                              f"has {n_own}")
    ids = model.token_ids
    old = {name: getattr(ids, name) for name in ("seg", "crop", "box", "image") if getattr(ids, name) < n_src}
    if old:
        raise CheckpointError(f"{source.where(source_key)}: our token(s) {sorted(old)} have ids {sorted(old.values())} "
                              f"inside the checkpoint's vocabulary of {n_src}; the tokenizer does not extend "
                              f"this checkpoint's vocabulary")
    return Entry(target, source_key, rows=[(i, i) for i in range(n_src)]), n_src


def _open_clip(clip_dir: Path) -> TensorSource:
    if not clip_dir.is_dir():
        raise CheckpointError(f"{clip_dir}: CLIP folder not found")
    if (clip_dir / "model.safetensors.index.json").is_file() or (clip_dir / "model.safetensors").is_file():
        return open_sharded_folder(clip_dir)
    for name in ("pytorch_model.bin", "model.pth"):
        if (clip_dir / name).is_file():
            return DictSource(load_tensors(clip_dir / name), str(clip_dir / name))
    raise CheckpointError(f"{clip_dir}: no model.safetensors(.index.json) or pytorch_model.bin")


def load_clip_vision(clip_dir, model) -> LoadReport:
    """A local HF CLIP folder (`vision_model.*` keys; text tower and projections ignored) → vision_tower."""
    source = _open_clip(Path(clip_dir))
    own, _ = own_tensors(model)
    report = LoadReport(source=source.where())
    keys = source.keys()
    source_prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
    keymap = vision_keymap(own, source_prefix)
    check_consumed(source, set(keymap), CLIP_IGNORE, report)
    execute([Entry(dst, src) for src, dst in keymap.items()], source, own, report)
    return report


def load_llava_med(folder, model, clip_dir=None) -> LoadReport:
    """Load LLaVA-Med v1.5 (original llava_mistral layout) into `model` (a `MediRound` whose sizes match).

    Fills language_model, mm_projector and vision_tower; leaves box_encoder, seg_projection, segmenter and
    jcm alone. New vocabulary rows (ids ≥ LLaVA-Med's vocab_size) are set to the mean of the old rows.
    Returns a `LoadReport`; raises `CheckpointError` naming the file and key on any mismatch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: LLaVA-Med folder not found")
    config = read_llava_config(folder)
    check_llava_config(config, model, str(folder / "config.json"))
    source = open_sharded_folder(folder)
    own, lora = own_tensors(model)
    report = LoadReport(source=source.where())

    plan, used = [], set()
    for src, dst in {**language_keymap(own), **projector_keymap(own)}.items():
        if src in EMBEDDING_KEYS:
            if src not in source:
                continue  # execute() reports it as missing below
            entry, n_src = embedding_entries(dst, src, source, own, model)
            plan.append(entry)
        else:
            plan.append(Entry(dst, src))
        used.add(src)
    for key in EMBEDDING_KEYS:
        if key not in source:
            raise CheckpointError(f"{source.where()}: missing key {key!r}")
    vocab = config.get("vocab_size")
    if vocab is not None and vocab != source.shape("model.embed_tokens.weight")[0]:
        raise CheckpointError(f"{folder / 'config.json'}: vocab_size {vocab} but model.embed_tokens.weight has "
                              f"{source.shape('model.embed_tokens.weight')[0]} rows")

    vision_map = vision_keymap(own, LLAVA_VISION)
    in_shards = [k for k in source.keys() if k.startswith(LLAVA_VISION)]
    if clip_dir is None:
        if not in_shards:
            missing = next(iter(vision_map))
            raise CheckpointError(f"{source.where()}: missing key {missing!r}: this LLaVA-Med folder carries no "
                                  f"vision tower; pass clip_dir (the local clip-vit-large-patch14-336 folder)")
        plan += [Entry(dst, src) for src, dst in vision_map.items()]
        used |= set(vision_map)
        report.notes.append("vision tower: from the LLaVA-Med shards")
    else:
        for key in in_shards:
            report.ignored[key] = "vision tower taken from clip_dir, as the public code does (delay_load)"
        used |= set(in_shards)

    check_consumed(source, used, IGNORE, report)
    execute(plan, source, own, report)
    if clip_dir is not None:
        report.merge(load_clip_vision(clip_dir, model))
        report.notes.append(f"vision tower: from {clip_dir}")

    n_src = source.shape("model.embed_tokens.weight")[0]
    with torch.no_grad():
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            table = own[key]
            if table.shape[0] > n_src:
                table[n_src:] = table[:n_src].float().mean(0, keepdim=True).to(table.dtype)
    if own["language_model.model.embed_tokens.weight"].shape[0] > n_src:
        report.notes.append(f"vocabulary rows {n_src}…{own['language_model.model.embed_tokens.weight'].shape[0] - 1} "
                            f"are new (our tokens): set to the mean of rows 0…{n_src - 1}")
    if lora:
        report.notes.append("the model carries LoRA adapters: LLaVA-Med weights went into the base layers; "
                            "adapters untouched")
    return report
