"""Our checkpoint format: a folder with `config.json`, `model.safetensors` and the tokenizer files
(+ `adapter/` when the language model carries LoRA). Exact round trip."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..model.config import MediRoundConfig
from .safety import load_strict, load_tensors

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(model, folder, tokenizer=None, storage_dtype: torch.dtype | None = None) -> None:
    """Write the folder; `storage_dtype` (e.g. float16 for the shipped weights) casts floating tensors on disk."""
    from safetensors.torch import save_file

    from ..model.lora import has_lora

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["lora_applied"] = has_lora(model)
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if storage_dtype is not None:
        state = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in state.items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "mediround_size": model.config.size})
    tmp.replace(folder / WEIGHTS)
    if has_lora(model):
        model.language_model.save_pretrained(str(folder / "adapter"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def read_config(folder) -> tuple[MediRoundConfig, bool]:
    """(config, whether the language model carries LoRA) of one of our folders, without loading weights."""
    folder = Path(folder)
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
        return MediRoundConfig.from_dict(data, source=str(folder / CONFIG)), lora
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


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
    if lora:
        apply_lora(model)
    state = align_vision_keys(load_tensors(folder / WEIGHTS), model.state_dict().keys())
    load_strict(model, state, str(folder / WEIGHTS))
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer
