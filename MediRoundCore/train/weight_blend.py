"""Blend two checkpoints of one model in weight space: (1 − α)·A + α·B, tensor by tensor.

A model and its own continuation lie close in weight space, and their average often keeps what each does well
(weight-space ensembling, as WiSE-FT does for a fine-tuned model and its start): MediRound-Lite's continuation
on a lent GPU scored higher on the generated sets but answered real lungs absent; a quarter of the way there kept
the real lungs and part of the gain (docs/design-notes.md). `--part PREFIX=ALPHA` gives the tensors under a
prefix their own α (e.g. the mask decoder all the way, the language model a quarter). Integer tensors (none in
Lite) are B's. The result is B's folder (config, tokenizer, files beside the weights) with the blended weights.

    python -m MediRoundCore.train.weight_blend A B ALPHA OUT [--part segmenter.mask_decoder=1.0 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError

WEIGHTS = "model.safetensors"


def lies_under(key: str, prefix: str) -> bool:
    """Whether tensor `key` is `prefix` or lies under it ("segmenter.mask_decoder" holds
    "segmenter.mask_decoder.iou_token.weight", not "segmenter.mask_decoder_x.weight")."""
    return key == prefix or key.startswith(prefix.rstrip(".") + ".")


def alpha_of(key: str, alpha: float, parts: dict[str, float]) -> float:
    """The α of a tensor: that of the longest prefix in `parts` it lies under, else `alpha`."""
    under = [p for p in parts if lies_under(key, p)]
    return parts[max(under, key=len)] if under else alpha


def blend_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float,
                  parts: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """(1 − α)·a + α·b per tensor in float32, stored in a's dtype; integer tensors from b."""
    parts = parts or {}
    for value in (alpha, *parts.values()):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"a blend's α must be from 0 to 1, got {value}")
    unused = [p for p in parts if not any(lies_under(k, p) for k in a)]
    if unused:
        raise ConfigError(f"no tensor lies under {', '.join(unused)}")
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        raise CheckpointError(f"the two checkpoints hold different tensors ({len(only)} in one only, e.g. {only[0]})")
    out = {}
    for key, x in a.items():
        y = b[key]
        if x.shape != y.shape:
            raise CheckpointError(f"{key}: shape {tuple(x.shape)} against {tuple(y.shape)}")
        if not x.is_floating_point():
            out[key] = y
            continue
        t = alpha_of(key, alpha, parts)
        out[key] = ((1 - t) * x.float() + t * y.float()).to(x.dtype)
    return out


def blend_checkpoints(a: str | Path, b: str | Path, alpha: float, out: str | Path,
                      parts: dict[str, float] | None = None) -> Path:
    """Write to `out` folder B with its weights blended with folder A's; returns `out`."""
    a, b, out = Path(a), Path(b), Path(out)
    if out.resolve() in (a.resolve(), b.resolve()):
        raise CheckpointError(f"{out}: write the blend to a folder of its own, not over an input")
    for folder in (a, b):
        if not (folder / WEIGHTS).is_file():
            raise CheckpointError(f"{folder}: no {WEIGHTS} (a model folder, e.g. `train.snapshot restore`'s)")
    configs = [json.loads((f / "config.json").read_text()) for f in (a, b)]
    if configs[0] != configs[1]:
        differ = sorted(k for k in set(configs[0]) | set(configs[1]) if configs[0].get(k) != configs[1].get(k))
        raise CheckpointError(f"{a} and {b} are not the same model (their configs differ in {', '.join(differ)})")
    blended = blend_tensors(load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS)), alpha, parts)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(b, tmp)
    save_file(blended, str(tmp / WEIGHTS))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _part(text: str) -> tuple[str, float]:
    prefix, sep, value = text.rpartition("=")
    try:
        if sep and prefix:
            return prefix, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"takes PREFIX=ALPHA, got {text!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="model folder A (weight 1 − α)")
    p.add_argument("b", help="model folder B (weight α): its config, tokenizer and other files are kept")
    p.add_argument("alpha", type=float)
    p.add_argument("out")
    p.add_argument("--part", type=_part, action="append", default=[],
                   help="PREFIX=ALPHA: the tensors under PREFIX (e.g. segmenter.mask_decoder) take this α")
    args = p.parse_args(argv)
    try:
        print(blend_checkpoints(args.a, args.b, args.alpha, args.out, dict(args.part)))
    except (CheckpointError, ConfigError) as e:
        print(f"weight_blend: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
