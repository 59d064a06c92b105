"""A training run carried across machines that keep nothing but the repository.

Our machines may start a session with a fresh clone: a run's `<out>/checkpoint` (float32 weights and the
optimiser state, ~280 MB for MediRound-Lite) is then gone. A snapshot keeps what the run cannot recompute, its
weights and its step, in a folder small enough to commit (~35 MB for Lite); `train.lite --from-snapshot`
continues from it with fresh optimiser moments (`Trainer.start_from`). Tensors are stored in float16, but for
those that start from a pinned base (Lite's word embeddings: MiniLM's, `model/lite.py:
initial_word_embeddings`), which are stored as their difference from it in int8 with one scale per row
(`checkpoints/base_delta.py`): the table is half of Lite's weights, and its rows move little from where they
started.

    python -m MediRoundCore.train.snapshot save runs/lite/checkpoint runs/lite-snapshot
    python -m MediRoundCore.train.snapshot show runs/lite-snapshot
    python -m MediRoundCore.train.snapshot restore runs/lite-snapshot runs/lite-stage1   # a model folder again
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ..checkpoints.base_delta import DELTA, SCALE, decode_against_bases, encode_against_bases
from ..errors import CheckpointError, ConfigError
from .folders import write_folder

WEIGHTS = "model.safetensors"
INFO = "snapshot.json"
FP16_MAX = float(torch.finfo(torch.float16).max)


def compact(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors as float16 where every value is finite and within its range and the largest is at least
    1e-3: ~3 digits of every value from 6e-5 up, below that an absolute error under 3e-8 (a tensor all of
    whose values are that small, e.g. a key bias that no gradient reaches, stays as it is). Others unchanged."""
    out = {}
    for key, value in tensors.items():
        top = float(value.abs().max()) if value.is_floating_point() and value.numel() else 0.0
        fits = value.is_floating_point() and bool(torch.isfinite(value).all()) and 1e-3 <= top < FP16_MAX
        out[key] = value.to(torch.float16).contiguous() if fits else value.contiguous()
    return out


def _is_delta(key: str) -> bool:
    return key.endswith((DELTA, SCALE))


def snapshot_step(folder: str | Path) -> int:
    """The step of a snapshot folder (-1 where there is none)."""
    try:
        return int(json.loads((Path(folder) / INFO).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def save_snapshot(checkpoint: str | Path, dest: str | Path, bases: dict | None = None, force: bool = False) -> dict:
    """Write `dest` from a trainer checkpoint folder (weights + trainer state); returns its info. `bases` (name →
    (key, shape → base tensor or None); default `BASES`) are the tensors stored against their starting point.
    A `dest` snapshot further on than the checkpoint (the run went on elsewhere) is kept unless `force`."""
    from safetensors.torch import save_file

    from ..checkpoints.safety import load_tensors
    from .trainer import STATE_FILE, load_trainer_state

    checkpoint, dest = Path(checkpoint), Path(dest)
    if not (checkpoint / WEIGHTS).is_file() or not (checkpoint / STATE_FILE).is_file():
        raise CheckpointError(f"{checkpoint}: not a training checkpoint (needs {WEIGHTS} and {STATE_FILE})")
    if dest.resolve() == checkpoint.resolve():
        raise CheckpointError(f"{dest}: the snapshot would replace the checkpoint it is made from")
    for _ in range(3):  # the trainer may save meanwhile: the weights must be those of the step read
        step = int(load_trainer_state(checkpoint / STATE_FILE)["step"])
        tensors = load_tensors(checkpoint / WEIGHTS)
        if int(load_trainer_state(checkpoint / STATE_FILE)["step"]) == step:
            break
    else:
        raise CheckpointError(f"{checkpoint}: saved again while read, three times; try again")
    there = snapshot_step(dest)
    if there > step and not force:
        raise CheckpointError(f"{dest} is at step {there}, further on than {checkpoint} (step "
                              f"{step}): kept (--force to replace it)")
    encoded, against = encode_against_bases(tensors, bases)
    plain = {k: v for k, v in encoded.items() if not _is_delta(k)}
    tensors = {**{k: v for k, v in encoded.items() if _is_delta(k)}, **compact(plain)}
    info = {"step": step, "tensors": len(tensors) - len(against),
            "float16": sum(1 for v in tensors.values() if v.dtype == torch.float16),
            "int8_delta": against, "from": str(checkpoint)}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
        if (checkpoint / "config.json").is_file():  # for the reader; the model is rebuilt by the training command
            shutil.copy2(checkpoint / "config.json", tmp / "config.json")

    write_folder(dest, write, inputs=(checkpoint,))
    return info


def load_snapshot(folder: str | Path, bases: dict | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """(weights, step) of a snapshot folder; tensors stored against a base are rebuilt from it."""
    from ..checkpoints.safety import load_tensors

    folder = Path(folder)
    try:
        info = json.loads((folder / INFO).read_text())
        step = int(info["step"])
        against = dict(info.get("int8_delta") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: not a training snapshot ({INFO} unreadable: {exc})") from None
    tensors = decode_against_bases(load_tensors(folder / WEIGHTS), against, str(folder), bases)
    return tensors, step


def restore_snapshot(folder: str | Path, dest: str | Path) -> int:
    """Write `dest` as a model folder (`save_pretrained`: float32, loadable by `MediRound.from_pretrained`) from a
    snapshot of a lite run, rebuilt on the pinned base weights with the snapshot's config; returns its step. The
    weights are the snapshot's (float16 and int8 deltas, widened): what continuing the run would start from."""
    from ..checkpoints.ours import not_stored, read_config
    from ..checkpoints.safety import load_strict
    from ..model.lite import build_lite

    folder, dest = Path(folder), Path(dest)
    config, lora = read_config(folder)
    if config.size != "lite" or lora:
        raise CheckpointError(f"{folder}: a {config.size} snapshot; restore rebuilds lite runs only")
    model, tokenizer = build_lite(config)
    weights, step = load_snapshot(folder)
    own = model.state_dict()
    load_strict(model, {k: v.to(own[k].dtype) if k in own else v for k, v in weights.items()}, str(folder),
                ignore_missing=not_stored(model.config))
    model.save_pretrained(dest, tokenizer)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MediRoundCore.train.snapshot", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="write a snapshot of a trainer checkpoint")
    save.add_argument("checkpoint")
    save.add_argument("dest")
    save.add_argument("--force", action="store_true", help="replace a snapshot further on than the checkpoint")
    show = sub.add_parser("show", help="print a snapshot's info")
    show.add_argument("folder")
    restore = sub.add_parser("restore", help="write a model folder from a lite snapshot")
    restore.add_argument("folder")
    restore.add_argument("dest")
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            info = save_snapshot(args.checkpoint, args.dest, force=args.force)
            size = (Path(args.dest) / WEIGHTS).stat().st_size / 2**20
            print(f"{args.dest}: step {info['step']}, {info['tensors']} tensors ({info['float16']} float16), "
                  f"{size:.1f} MiB")
        elif args.command == "restore":
            step = restore_snapshot(args.folder, args.dest)
            print(f"{args.dest}: the model of {args.folder} at step {step}")
        else:
            print((Path(args.folder) / INFO).read_text().strip())
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
