"""A training run carried across machines that keep nothing but the repository.

Our machines may start a session with a fresh clone: a run's `<out>/checkpoint` (float32 weights and the
optimiser state, ~280 MB for MediRound-Lite) is then gone. A snapshot keeps what the run cannot recompute, its
weights in float16 and its step, in a folder small enough to commit (~48 MB for Lite); `train.lite
--from-snapshot` continues from it with fresh optimiser moments (`Trainer.start_from`).

    python -m MediRoundCore.train.snapshot save runs/lite/checkpoint runs/lite-snapshot
    python -m MediRoundCore.train.snapshot show runs/lite-snapshot
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError

WEIGHTS = "model.safetensors"
INFO = "snapshot.json"
FP16_MAX = float(torch.finfo(torch.float16).max)


def compact(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors as float16 where every value fits its range (else kept as they are); others unchanged."""
    out = {}
    for key, value in tensors.items():
        fits = value.is_floating_point() and (value.numel() == 0 or (bool(torch.isfinite(value).all())
                                                                     and float(value.abs().max()) < FP16_MAX))
        out[key] = value.to(torch.float16).contiguous() if fits else value.contiguous()
    return out


def save_snapshot(checkpoint: str | Path, dest: str | Path) -> dict:
    """Write `dest` from a trainer checkpoint folder (weights + trainer state); returns its info."""
    from safetensors.torch import save_file

    from ..checkpoints.safety import load_tensors
    from .trainer import STATE_FILE, load_trainer_state

    checkpoint, dest = Path(checkpoint), Path(dest)
    if not (checkpoint / WEIGHTS).is_file() or not (checkpoint / STATE_FILE).is_file():
        raise CheckpointError(f"{checkpoint}: not a training checkpoint (needs {WEIGHTS} and {STATE_FILE})")
    step = int(load_trainer_state(checkpoint / STATE_FILE)["step"])
    tensors = compact(load_tensors(checkpoint / WEIGHTS))
    info = {"step": step, "tensors": len(tensors),
            "float16": sum(1 for v in tensors.values() if v.dtype == torch.float16),
            "from": str(checkpoint)}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS))
    (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return info


def load_snapshot(folder: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """(weights, step) of a snapshot folder."""
    from ..checkpoints.safety import load_tensors

    folder = Path(folder)
    try:
        info = json.loads((folder / INFO).read_text())
        step = int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: not a training snapshot ({INFO} unreadable: {exc})") from None
    return load_tensors(folder / WEIGHTS), step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MediRoundCore.train.snapshot", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="write a snapshot of a trainer checkpoint")
    save.add_argument("checkpoint")
    save.add_argument("dest")
    show = sub.add_parser("show", help="print a snapshot's info")
    show.add_argument("folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            info = save_snapshot(args.checkpoint, args.dest)
            size = (Path(args.dest) / WEIGHTS).stat().st_size / 2**20
            print(f"{args.dest}: step {info['step']}, {info['tensors']} tensors ({info['float16']} float16), "
                  f"{size:.1f} MiB")
        else:
            print((Path(args.folder) / INFO).read_text().strip())
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
