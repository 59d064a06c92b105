"""Safe tensor loading and strict state-dict matching with errors that name the key."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import CheckpointError


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file, or a `.pth/.bin` through `torch.load(weights_only=True)` only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise beside our own message
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text suggests weights_only=False; we never do that: keep only the line naming the object
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise CheckpointError(f"{path}: refused: the file holds objects other than tensors, which could run "
                              f"code on load; it was not loaded ({detail[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dictionary of tensors")
    return data


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                ignore_missing: Iterable[str] = ()) -> None:
    """Load `state` into `module`; any missing or unexpected key or shape mismatch is an error naming it.
    `ignore_missing` lists key prefixes the caller deliberately leaves at their initial values."""
    own = module.state_dict()
    ignore = tuple(ignore_missing)
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(ignore))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)}, "
                                  f"model {tuple(own[key].shape)}")
    module.load_state_dict(state, strict=False)
