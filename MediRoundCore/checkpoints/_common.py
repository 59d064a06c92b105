"""Shared machinery of the external-checkpoint loaders (LLaVA-Med, MedSAM, official MediRound).

A loader builds a *plan*: for every tensor of our model that it fills, which source key (and optional row
mapping) supplies it. `TensorSource` gives lazy access to the source tensors, so a 7B checkpoint is copied
one tensor at a time into the model's own storage (no second full copy in memory). Every source key is
either consumed by the plan or matched by an explicit ignore rule; anything else, a model key left
uncovered, or a shape mismatch raises `CheckpointError` naming the file and the key.

Our keys are *canonical*: the names of `MediRound.state_dict()` on a model without LoRA. On a model whose
language model is peft-wrapped, `own_tensors` maps the wrapped names back (`base_model.model.` and
`.base_layer` are dropped) and lists the LoRA tensors separately.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..errors import CheckpointError

MANIFEST_DIR = Path(__file__).with_name("manifests")


def load_manifest(name: str) -> dict:
    """One of the committed key manifests (`llava_med_v15_mistral`, `medsam_vit_b`, `mediround_official`)."""
    path = MANIFEST_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: manifest not found") from None


# -- sources -----------------------------------------------------------------------------------------
class TensorSource:
    """Read-only, lazy mapping of checkpoint keys to tensors; `where(key)` names the file holding a key."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def where(self, key: str | None = None) -> str:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())


class DictSource(TensorSource):
    """Tensors already in memory (a `.pth`/`.bin` read through `safety.load_tensors`)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str, files: Mapping[str, str] | None = None):
        self._tensors = dict(tensors)
        self._name = name
        self._files = dict(files or {})

    def keys(self):
        return list(self._tensors)

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def get(self, key):
        return self._tensors[key]

    def where(self, key=None):
        return self._files.get(key, self._name) if key is not None else self._name

    def __contains__(self, key):
        return key in self._tensors


class SafetensorsSource(TensorSource):
    """One or more `.safetensors` files read lazily (a single file, or shards listed by an index.json)."""

    def __init__(self, key_to_file: Mapping[str, Path], name: str):
        from safetensors import safe_open

        self._name = name
        self._file_of = {}
        self._handles = {}
        self._shapes = {}
        files = sorted(set(map(Path, key_to_file.values())))
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed by {name} not found")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            self._handles[path] = handle
            for key in handle.keys():
                self._shapes[key] = tuple(handle.get_slice(key).get_shape())
                self._file_of[key] = path
        for key, path in key_to_file.items():
            if key not in self._file_of:
                raise CheckpointError(f"{name}: key {key!r} is listed for {Path(path).name} but that file lacks it")
            if self._file_of[key] != Path(path):
                raise CheckpointError(f"{name}: key {key!r} is listed for {Path(path).name} but stored in "
                                      f"{self._file_of[key].name}")

    @classmethod
    def from_files(cls, files: Iterable[Path], name: str) -> "SafetensorsSource":
        from safetensors import safe_open

        mapping = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        mapping[key] = Path(path)
            except FileNotFoundError:
                raise CheckpointError(f"{path}: checkpoint file not found") from None
            except Exception as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        return cls(mapping, name)

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]

    def get(self, key):
        return self._handles[self._file_of[key]].get_tensor(key)

    def where(self, key=None):
        if key is not None and key in self._file_of:
            return str(self._file_of[key])
        return self._name

    def __contains__(self, key):
        return key in self._shapes


def open_sharded_folder(folder: Path) -> SafetensorsSource:
    """HF-style folder: `model.safetensors.index.json` + shards, or a single `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        for key, name in weight_map.items():
            if not isinstance(name, str) or Path(name).name != name:
                raise CheckpointError(f"{index}: shard name for {key!r} must be a plain file name, got {name!r}")
        return SafetensorsSource({k: folder / v for k, v in weight_map.items()}, str(index))
    single = folder / "model.safetensors"
    if single.is_file():
        return SafetensorsSource.from_files([single], str(single))
    raise CheckpointError(f"{folder}: no model.safetensors.index.json or model.safetensors")


# -- our side ----------------------------------------------------------------------------------------
def own_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(canonical key → tensor, LoRA key → tensor) sharing storage with `model`'s parameters and buffers.

    LoRA keys are given as `language_model.model.layers.N.self_attn.q_proj.lora_A` / `lora_B`."""
    base, lora = {}, {}
    for key, tensor in model.state_dict().items():
        if key.startswith("language_model.base_model.model."):
            key = "language_model." + key[len("language_model.base_model.model."):]
            if ".lora_" in key:
                m = re.match(r"(.*)\.(lora_[AB])\.[^.]+\.weight$", key)
                if m is None:
                    raise CheckpointError(f"unsupported LoRA tensor {key!r} in the model")
                lora[f"{m.group(1)}.{m.group(2)}"] = tensor
                continue
            key = key.replace(".base_layer.", ".")
        base[key] = tensor
    return base, lora


def vision_prefix(own: Mapping[str, torch.Tensor]) -> str:
    """Our CLIP vision tower's key prefix: transformers 4.x nests `vision_model.`, 5.x does not."""
    return "vision_tower.vision_model." if any(k.startswith("vision_tower.vision_model.") for k in own) else "vision_tower."


# -- plans -------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """Fill our tensor `target` from `source` key (whole tensor, or only the listed rows)."""

    target: str
    source: str
    rows: list[tuple[int, int]] | None = None  # (our_row, source_row); None = whole tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to the source tensor first


@dataclass
class LoadReport:
    """What a loader did: which of our keys it filled, which source keys it ignored and why, notes."""

    source: str
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # source key → reason
    notes: list[str] = field(default_factory=list)

    def merge(self, other: "LoadReport") -> "LoadReport":
        self.loaded += other.loaded
        self.ignored.update(other.ignored)
        self.notes += other.notes
        return self


def ignore_reason(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    for pattern, reason in rules:
        if re.search(pattern, key):
            return reason
    return None


def check_consumed(source: TensorSource, used: set[str], rules, report: LoadReport) -> None:
    """Every source key is used by the plan or deliberately ignored; else an unexpected-key error."""
    for key in source.keys():
        if key in used:
            continue
        reason = ignore_reason(key, rules)
        if reason is None:
            raise CheckpointError(f"{source.where(key)}: unexpected key {key!r} (not part of the "
                                  f"expected layout)")
        report.ignored[key] = reason


def require(source: TensorSource, key: str, wanted_by: str | None = None) -> None:
    if key not in source:
        extra = f" (needed for {wanted_by})" if wanted_by else ""
        raise CheckpointError(f"{source.where()}: missing key {key!r}{extra}")


def validate(plan: list[Entry], source: TensorSource, own: Mapping[str, torch.Tensor]) -> None:
    """Every source key of the plan exists, every target exists, shapes (or row ranges) fit."""
    for entry in plan:
        require(source, entry.source, entry.target)
        if entry.target not in own:
            raise CheckpointError(f"{source.where(entry.source)}: key {entry.source!r} maps to {entry.target!r}, "
                                  f"which the model does not have")
        src_shape, dst_shape = source.shape(entry.source), tuple(own[entry.target].shape)
        if entry.rows is None and entry.transform is None and src_shape != dst_shape:
            raise CheckpointError(f"{source.where(entry.source)}: shape mismatch for {entry.source!r}: checkpoint "
                                  f"{src_shape}, model {entry.target!r} {dst_shape}")
        if entry.rows is not None:
            if src_shape[1:] != dst_shape[1:]:
                raise CheckpointError(f"{source.where(entry.source)}: shape mismatch for {entry.source!r}: "
                                      f"checkpoint {src_shape}, model {entry.target!r} {dst_shape}")
            bad = [(o, s) for o, s in entry.rows if not (0 <= o < dst_shape[0] and 0 <= s < src_shape[0])]
            if bad:
                raise CheckpointError(f"{source.where(entry.source)}: row mapping out of range for "
                                      f"{entry.source!r}: {bad[0]}")


def execute(plan: list[Entry], source: TensorSource, own: Mapping[str, torch.Tensor], report: LoadReport) -> None:
    """Validate the whole plan (keys and shapes) before writing anything, then copy tensor by tensor."""
    validate(plan, source, own)
    with torch.no_grad():
        for entry in plan:
            tensor = source.get(entry.source)
            if entry.transform is not None:
                tensor = entry.transform(tensor)
            dst = own[entry.target]
            if entry.rows is None:
                if tuple(tensor.shape) != tuple(dst.shape):
                    raise CheckpointError(f"{source.where(entry.source)}: shape mismatch for {entry.source!r}: "
                                          f"{tuple(tensor.shape)} vs model {tuple(dst.shape)}")
                dst.copy_(tensor.to(dst.dtype))
            else:
                ours = torch.tensor([o for o, _ in entry.rows], dtype=torch.long)
                theirs = torch.tensor([s for _, s in entry.rows], dtype=torch.long)
                dst[ours] = tensor[theirs].to(dst.dtype)
            report.loaded.append(entry.target)
