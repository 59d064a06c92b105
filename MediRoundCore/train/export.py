"""Export a trained checkpoint as the shipped default model (float16 on disk, the chosen JCM β in its config,
the checkpoint's reference scorer or else the one the destination had)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ..engine import DEFAULT_CHECKPOINT
from ..model.modeling import MediRound
from ..reference_scorer import ReferenceScorer


def export_default(checkpoint, dest=DEFAULT_CHECKPOINT, beta: float | None = None) -> Path:
    model, tokenizer = MediRound.from_pretrained(checkpoint)
    if beta is not None:
        model.config.jcm.beta = float(beta)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer, storage_dtype=torch.float16)
    scorer = ReferenceScorer.from_pretrained(checkpoint)
    if scorer is None and dest.is_dir():
        scorer = ReferenceScorer.from_pretrained(dest)  # keep the reference scorer the folder had
    if scorer is not None:
        scorer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--dest", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--beta", type=float)
    args = p.parse_args(argv)
    print(export_default(args.checkpoint, args.dest, args.beta))


if __name__ == "__main__":
    main()
