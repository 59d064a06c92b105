"""Blend two checkpoints of one model in weight space: (1 − α)·A + α·B, tensor by tensor.

A model and its own continuation lie close in weight space, and their average often keeps what each does well
(weight-space ensembling, as WiSE-FT does for a fine-tuned model and its start). `--part PREFIX=ALPHA` gives the
tensors under a prefix their own α; the longest prefix a tensor lies under decides. Both folders load as models
(`MediRound.from_pretrained`: exported folders too), so the result is written as any checkpoint is, in float32,
with B's tokenizer and the reference scorer, lesion finder and answer drafts B has. runs/blend_lite.sh makes the
shipped MediRound-Lite this way (docs/design-notes.md).

    python -m MediRoundCore.train.weight_blend A B ALPHA OUT [--part segmenter.mask_decoder=1.0 ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..lesion_finder import CONFIG_FILE as FINDER_CONFIG, WEIGHTS_FILE as FINDER_WEIGHTS
from ..model.modeling import MediRound
from .carry_jcm import KEPT_FILES, config_differences
from .folders import check_destination, copy_file_groups, write_folder

BESIDE_THE_WEIGHTS = (*KEPT_FILES, (FINDER_CONFIG, FINDER_WEIGHTS))  # each group copied from B when B has all of it


def lies_under(key: str, prefix: str) -> bool:
    """Whether tensor `key` is `prefix` or lies under it ("segmenter.mask_decoder" holds
    "segmenter.mask_decoder.iou_token.weight", not "segmenter.mask_decoder_x.weight")."""
    return key == prefix or key.startswith(prefix + ".")


def alpha_of(key: str, alpha: float, parts: dict[str, float]) -> float:
    """The α of a tensor: that of the longest prefix in `parts` it lies under, else `alpha`."""
    under = [p for p in parts if lies_under(key, p)]
    return parts[max(under, key=len)] if under else alpha


def check_alphas(alpha: float, parts: dict[str, float]) -> dict[str, float]:
    """`parts` with prefixes written without a trailing dot; ConfigError for an α outside [0, 1] (NaN too) or a
    prefix given twice."""
    clean: dict[str, float] = {}
    for prefix, value in parts.items():
        key = prefix.rstrip(".")
        if not key or key in clean:
            raise ConfigError(f"--part {prefix!r}: " + ("an empty prefix" if not key else "given twice"))
        clean[key] = value
    for value in (alpha, *clean.values()):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"a blend's α must be from 0 to 1, got {value}")
    return clean


def blend_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float,
                  parts: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """(1 − α)·a + α·b per floating tensor, computed in float32 and kept in its dtype; other tensors from b."""
    parts = check_alphas(alpha, parts or {})
    unused = [p for p in parts if not any(lies_under(k, p) and a[k].is_floating_point() for k in a)]
    if unused:
        groups = sorted({k.split(".")[0] for k in a})
        raise ConfigError(f"no weight lies under {', '.join(unused)} (the model's groups: {', '.join(groups)})")
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        raise CheckpointError(f"the two models hold different tensors ({len(only)} in one only, e.g. {only[0]})")
    out = {}
    for key, x in a.items():
        y = b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            raise CheckpointError(f"{key}: {tuple(x.shape)} {x.dtype} against {tuple(y.shape)} {y.dtype}")
        if not x.is_floating_point():
            out[key] = y
            continue
        t = alpha_of(key, alpha, parts)
        out[key] = ((1 - t) * x.float() + t * y.float()).to(x.dtype)
    return out


def blend_checkpoints(a: str | Path, b: str | Path, alpha: float, out: str | Path,
                      parts: dict[str, float] | None = None) -> Path:
    """Write to `out` the blend of model folders A and B (B's tokenizer and files); returns `out`."""
    a, b = Path(a), Path(b)
    check_alphas(alpha, parts or {})  # before loading two models
    check_destination(out, inputs=(a, b))
    model_a, _ = MediRound.from_pretrained(a)
    model, tokenizer = MediRound.from_pretrained(b)
    differ = config_differences(model_a, model)
    if differ:
        raise CheckpointError(f"{a} and {b} are not the same model (their configs differ in {', '.join(differ)})")
    model.load_state_dict(blend_tensors(model_a.state_dict(), model.state_dict(), alpha, parts))

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, tokenizer)
        copy_file_groups(BESIDE_THE_WEIGHTS, (b,), tmp)

    return write_folder(out, write, inputs=(a, b))


def _part(text: str) -> tuple[str, float]:
    prefix, sep, value = text.rpartition("=")
    try:
        if sep and prefix:
            return prefix, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"takes PREFIX=ALPHA, got {text!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m MediRoundCore.train.weight_blend",
                                description=__doc__.split("\n")[0])
    p.add_argument("a", help="model folder A (weight 1 − α)")
    p.add_argument("b", help="model folder B (weight α): its tokenizer and the files beside its weights are kept")
    p.add_argument("alpha", type=float)
    p.add_argument("out")
    p.add_argument("--part", type=_part, action="append", default=[],
                   help="PREFIX=ALPHA: the tensors under PREFIX (e.g. segmenter.mask_decoder) take this α")
    args = p.parse_args(argv)
    prefixes = [prefix.rstrip(".") for prefix, _ in args.part]
    if len(set(prefixes)) != len(prefixes):
        p.error("--part: a prefix given twice")
    try:
        print(blend_checkpoints(args.a, args.b, args.alpha, args.out, dict(args.part)))
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
