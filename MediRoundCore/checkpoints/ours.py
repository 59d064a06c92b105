"""Our checkpoint format: a folder with `config.json`, `model.safetensors` and the tokenizer files
(+ `adapter/` when the language model carries LoRA). Exact round trip."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..model.config import MediRoundConfig
from .base_delta import SCALE, decode_against_bases, encode_against_bases
from .safety import load_strict, load_tensors

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED_HEAD = "language_model.lm_head.weight"
AGAINST_BASES = "mediround_int8_delta"  # metadata: {key: base name} of tensors stored against a pinned base


def not_stored(config) -> tuple[str, ...]:
    """Key prefixes a checkpoint of `config` does not hold: base weights filled from pinned packages on load
    (`config.base_weights`), and the output head when it is tied to the word embeddings."""
    skip = tuple(config.base_weights)
    return skip + ((TIED_HEAD,) if config.text.tie_word_embeddings else ())


def save_pretrained(model, folder, tokenizer=None, storage_dtype: torch.dtype | None = None,
                    against_bases: bool = False) -> None:
    """Write the folder; `storage_dtype` (e.g. float16 for the shipped weights) casts floating tensors on disk;
    `against_bases` stores tensors that start from a pinned base (lite's word embeddings) as their int8 change
    from it (`base_delta.py`), where that base is here."""
    from safetensors.torch import save_file

    from ..model.lora import has_lora

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["lora_applied"] = has_lora(model)
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    skip = not_stored(model.config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}
    against = {}
    if against_bases:
        state, against = encode_against_bases(state)
    if storage_dtype is not None:
        state = {k: v.to(storage_dtype) if v.is_floating_point() and not k.endswith(SCALE) else v
                 for k, v in state.items()}
    metadata = {"format": "pt", "mediround_size": model.config.size}
    if against:
        metadata[AGAINST_BASES] = json.dumps(against)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(folder / WEIGHTS)
    if has_lora(model):
        model.language_model.save_pretrained(str(folder / "adapter"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def stored_against_bases(path) -> dict[str, str]:
    """{key: base name} of the tensors a weights file stores against a pinned base (its metadata); {} if none."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(AGAINST_BASES)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if not text:
        return {}
    try:
        against = json.loads(text)
    except ValueError:
        against = None
    if not isinstance(against, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in against.items()):
        raise CheckpointError(f"{path}: its {AGAINST_BASES!r} metadata is not a map of keys to base names")
    return against


def read_config(folder) -> tuple[MediRoundConfig, bool]:
    """(config, whether the language model carries LoRA) of one of our folders, without loading weights."""
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(f"{folder}: is a file; --checkpoint takes a MediRound checkpoint folder (config.json, "
                              f"model.safetensors and the tokenizer files)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG} (is this a MediRound checkpoint folder?)")
    try:
        data = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder / CONFIG}: expected a JSON object")
    lora = bool(data.pop("lora_applied", False))
    try:
        config = MediRoundConfig.from_dict(data, source=str(folder / CONFIG))
        check_sizes(config, str(folder / CONFIG))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return config, lora


# Whole-number fields that may be 0 or negative (everything else that is a whole number must be positive).
_SIGNED_FIELDS = {"select_layer"}


def check_sizes(config: MediRoundConfig, source: str) -> None:
    """Sizes a model can be built with: positive widths, depths, heads and image sizes that divide as the
    layers need, finite positive constants; a ConfigError names the field."""
    import dataclasses
    import math

    for part in ("text", "vision", "segmenter", "jcm", None):
        obj = config if part is None else getattr(config, part)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            name = f.name if part is None else f"{part}.{f.name}"
            kind = str(f.type)
            if kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                             or (kind == "int" and not isinstance(value, int))):
                raise ConfigError(f"{source}: {name} must be a {'whole ' if kind == 'int' else ''}number, "
                                  f"got {value!r}")
            if kind == "int" and value <= 0 and f.name not in _SIGNED_FIELDS:
                raise ConfigError(f"{source}: {name} must be a positive whole number, got {value}")
            if kind == "float" and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{source}: {name} must be a finite number of 0 or more, got {value}")
    pairs = [("text.hidden_size", config.text.hidden_size, "text.num_attention_heads", config.text.num_attention_heads),
             ("text.num_attention_heads", config.text.num_attention_heads, "text.num_key_value_heads",
              config.text.num_key_value_heads),
             ("vision.hidden_size", config.vision.hidden_size, "vision.num_attention_heads",
              config.vision.num_attention_heads),
             ("vision.image_size", config.vision.image_size, "vision.patch_size", config.vision.patch_size),
             ("segmenter.image_size", config.segmenter.image_size, "segmenter.patch_size", config.segmenter.patch_size),
             ("segmenter.embed_dim", config.segmenter.embed_dim, "segmenter.num_heads", config.segmenter.num_heads)]
    for a_name, a, b_name, b in pairs:
        if a is None or b is None:  # a size this model's parts do not use (e.g. the ViT's on a TinyViT segmenter)
            continue
        if a % b:
            raise ConfigError(f"{source}: {a_name} ({a}) must be a multiple of {b_name} ({b})")
    depth = config.segmenter.depth
    bad = [i for i in config.segmenter.global_attn_indexes if not (isinstance(i, int) and 0 <= i < depth)]
    if bad:
        raise ConfigError(f"{source}: segmenter.global_attn_indexes {bad} lie outside the {depth} layers")
    if not -config.vision.num_hidden_layers - 1 <= config.vision.select_layer <= config.vision.num_hidden_layers:
        raise ConfigError(f"{source}: vision.select_layer {config.vision.select_layer} is not a layer of the "
                          f"{config.vision.num_hidden_layers}-layer vision tower")


def check_finite(state: dict, source: str) -> None:
    """Refuse weights holding NaN or infinite values (a diverged run, a damaged file), naming the tensor."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s) of "
                                  f"{tensor.numel()}; the checkpoint is damaged (a diverged training run?) and "
                                  f"would give meaningless masks")


_VISION = "vision_tower."
_CLIP_INNER = "vision_model."


def align_vision_keys(state: dict, model_keys) -> dict:
    """The vision tower's keys as this transformers names them. CLIPVisionModel keeps its weights under
    `vision_model.` in transformers 4.x and directly in 5.x, so a folder saved under one names them
    `vision_tower.vision_model.<x>` and the other expects `vision_tower.<x>` (or the reverse). Other keys, and
    keys that already match, stay as they are."""
    own = set(model_keys)
    out = {}
    for key, value in state.items():
        if key.startswith(_VISION) and key not in own:
            rest = key[len(_VISION):]
            other = (_VISION + rest[len(_CLIP_INNER):] if rest.startswith(_CLIP_INNER)
                     else _VISION + _CLIP_INNER + rest)
            if other in own:
                key = other
        out[key] = value
    return out


def from_pretrained(folder, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from one of our folders; errors name the file and the key."""
    from ..model.lora import apply_lora
    from ..model.modeling import MediRound
    from ..model.tokenizer import TokenIds, load_tokenizer

    folder = Path(folder)
    config, lora = read_config(folder)
    tokenizer = load_tokenizer(folder)
    ids = TokenIds.from_tokenizer(tokenizer)
    if len(tokenizer) > config.text.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                              f"{config.text.vocab_size}")
    model = MediRound(config, ids)
    if config.base_weights:
        from ..model.lite import load_base_weights

        load_base_weights(model)
    if lora:
        apply_lora(model)
    state = load_tensors(folder / WEIGHTS)
    against = stored_against_bases(folder / WEIGHTS)
    if against:
        state = decode_against_bases(state, against, str(folder / WEIGHTS))
    state = align_vision_keys(state, model.state_dict().keys())
    check_finite(state, str(folder / WEIGHTS))
    load_strict(model, state, str(folder / WEIGHTS), ignore_missing=not_stored(config))
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer
