"""MedSAM `medsam_vit_b.pth` → our segmenter.

The file is a plain SAM ViT-B state dict (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`, as
`segment_anything.build_sam_vit_b` builds it; MedSAM fine-tunes all three). It is read only through
`safety.load_tensors` (`torch.load(weights_only=True)`): a pickle carrying code is refused, never run. We
never call `build_sam(checkpoint=…)`, which unpickles without that protection.

Every key maps to `segmenter.<key>`. SAM's pixel mean/std are non-persistent buffers fixed by our config; if
a file carries them anyway they are ignored.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ._common import DictSource, Entry, LoadReport, check_consumed, execute, own_tensors
from .safety import load_tensors

IGNORE = [(r"^pixel_(mean|std)$", "input normalisation is fixed by our config (segmenter_normalization)")]


def segmenter_keymap(own, source_prefix: str = "") -> dict[str, str]:
    """Source key (SAM layout, optionally prefixed) → our `segmenter.*` key, for every segmenter tensor."""
    return {source_prefix + k[len("segmenter."):]: k for k in own if k.startswith("segmenter.")}


def load_medsam(path, model) -> LoadReport:
    """Load a MedSAM/SAM ViT-B `.pth` (or `.safetensors`) into `model.segmenter`; strict: every key of the file
    is used or deliberately ignored, every segmenter tensor is filled, shapes must match."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: expected the MedSAM checkpoint file (medsam_vit_b.pth), got a folder")
    source = DictSource(load_tensors(path), str(path))
    own, _ = own_tensors(model)
    report = LoadReport(source=str(path))
    keymap = segmenter_keymap(own)
    check_consumed(source, set(keymap), IGNORE, report)
    execute([Entry(dst, src) for src, dst in keymap.items()], source, own, report)
    return report
