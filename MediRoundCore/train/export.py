"""Export a trained checkpoint as the shipped default model: float16 on disk (tensors that start from a pinned
base as their int8 change from it: lite's word embeddings, `checkpoints/base_delta.py`), the chosen JCM β in its
config, the checkpoint's reference scorer or else the one the destination had, and answer drafts for its
tokenizer: the checkpoint's, or made from the training dialogues."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ..engine import DEFAULT_CHECKPOINT
from ..model.answer_drafts import DRAFTS_FILE, build_for_checkpoint
from ..model.modeling import MediRound
from ..reference_scorer import ReferenceScorer


def export_default(checkpoint, dest=DEFAULT_CHECKPOINT, beta: float | None = None, drafts_dialogues: int = 400) -> Path:
    model, tokenizer = MediRound.from_pretrained(checkpoint)
    if beta is not None:
        model.config.jcm.beta = float(beta)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer, storage_dtype=torch.float16, against_bases=True)
    scorer = ReferenceScorer.from_pretrained(checkpoint)
    if scorer is None and dest.is_dir():
        scorer = ReferenceScorer.from_pretrained(dest)  # keep the reference scorer the folder had
    if scorer is not None:
        scorer.save_pretrained(tmp)
    drafts = Path(checkpoint) / DRAFTS_FILE
    if drafts.is_file():
        shutil.copyfile(drafts, tmp / DRAFTS_FILE)
    elif drafts_dialogues > 0:
        build_for_checkpoint(tmp, drafts_dialogues)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--dest", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--beta", type=float)
    p.add_argument("--drafts-dialogues", type=int, default=400,
                   help="training dialogues the answer drafts are made from, when the checkpoint has none (400)")
    args = p.parse_args(argv)
    print(export_default(args.checkpoint, args.dest, args.beta, args.drafts_dialogues))


if __name__ == "__main__":
    main()
