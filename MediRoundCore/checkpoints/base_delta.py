"""Tensors stored as their change from a pinned base: int8 with one scale per row.

Lite's word embeddings (also its tied output head) start from MiniLM's (`model/lite.py:
initial_word_embeddings`) and move little: as their difference from MiniLM in int8, the table, half of Lite's
weights, takes a quarter of its float16 size. Training snapshots (`train/snapshot.py`) and the shipped weights
(`train/export.py`, `checkpoints/ours.py`) store it so; reading one needs the pinned base here.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import CheckpointError

DELTA, SCALE = "::int8_delta", "::delta_scale"  # key suffixes of a tensor stored against its base


def lite_word_embeddings(shape) -> torch.Tensor | None:
    """Lite's starting word embeddings when they fit `shape` and the pinned MiniLM weights are here, else None."""
    from ..model.config import MINILM_VOCAB
    from ..model.lite import initial_word_embeddings

    if len(shape) != 2 or shape[0] < MINILM_VOCAB:
        return None
    try:
        base = initial_word_embeddings(shape[0] - MINILM_VOCAB)
    except (CheckpointError, OSError):
        return None
    return base if tuple(base.shape) == tuple(shape) else None


Bases = dict[str, tuple[str, Callable[[tuple], "torch.Tensor | None"]]]
# name -> (state-dict key, shape -> the base tensor, or None where it does not fit or is not here)
BASES: Bases = {"lite_word_embeddings": ("language_model.model.embed_tokens.weight", lite_word_embeddings)}


def quantize_delta(value: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scale per row) of value - base: symmetric, each row's largest change is ±127."""
    delta = value.float() - base.float()
    if not bool(torch.isfinite(delta).all()):
        raise CheckpointError("the weights hold non-finite values: not stored against their base")
    scale = delta.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(delta / scale).clamp(-127, 127).to(torch.int8), scale


def dequantize_delta(rows: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return base.float() + rows.float() * scale.float()


def encode_against_bases(tensors: dict[str, torch.Tensor], bases: Bases | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors with each base-derived one replaced by its int8 rows and scales, {key: base name}); a tensor
    whose base does not fit or is not here stays as it is."""
    out, against = dict(tensors), {}
    for name, (key, make) in (BASES if bases is None else bases).items():
        base = make(tuple(out[key].shape)) if key in out else None
        if base is not None:
            out[key + DELTA], out[key + SCALE] = quantize_delta(out.pop(key), base)
            against[key] = name
    return out, against


def decode_against_bases(tensors: dict[str, torch.Tensor], against: dict[str, str], source: str,
                         bases: Bases | None = None) -> dict[str, torch.Tensor]:
    """The tensors `encode_against_bases` stored, rebuilt from their bases (in place); errors name `source`."""
    bases = BASES if bases is None else bases
    for key, name in against.items():
        if name not in bases or key + DELTA not in tensors or key + SCALE not in tensors:
            raise CheckpointError(f"{source}: {key} is stored against base {name!r}, which is "
                                  f"{'unknown' if name not in bases else 'missing from the file'}")
        rows, scale = tensors.pop(key + DELTA), tensors.pop(key + SCALE)
        if (rows.dtype != torch.int8 or rows.dim() != 2 or not scale.is_floating_point()
                or tuple(scale.shape) != (rows.shape[0], 1)):
            raise CheckpointError(f"{source}: {key} is stored against {name} as int8 rows {tuple(rows.shape)} "
                                  f"({rows.dtype}) with scales {tuple(scale.shape)} ({scale.dtype}): expected int8 "
                                  f"(rows, width) and one floating scale per row")
        base = bases[name][1](tuple(rows.shape))
        if base is None:
            raise CheckpointError(f"{source}: {key} is stored against {name}, which is not available here "
                                  f"(python -m MediRoundCore.checkpoints.base_weights fetch)")
        tensors[key] = dequantize_delta(rows, scale, base)
    return tensors
