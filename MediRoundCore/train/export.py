"""Export a trained checkpoint into the bundled weights folder of its size (`weights/mediround-<size>`; which
one is the default model, `checkpoint_info.DEFAULT_CHECKPOINT` says): float16 on disk (tensors that start from a pinned
base as their int8 change from it: lite's word embeddings, `checkpoints/base_delta.py`), the chosen JCM β in its
config, the checkpoint's reference scorer or else the one the destination had, its lesion finder or else the
destination's when trained on the same segmenter encoder, and answer drafts for its tokenizer: the checkpoint's,
or made from the training dialogues."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ..engine import DEFAULT_CHECKPOINT
from ..model.answer_drafts import DRAFTS_FILE, build_for_checkpoint
from ..model.modeling import MediRound
from ..lesion_finder import LesionFinder
from ..reference_scorer import ReferenceScorer
from .embedding_cache import encoder_fingerprint
from .folders import write_folder


def bundled_folder(size: str) -> Path:
    """The bundled weights folder of a model size: a tiny checkpoint never replaces the lite model."""
    return DEFAULT_CHECKPOINT.parent / f"mediround-{size}"


def export_default(checkpoint, dest=None, beta: float | None = None, drafts_dialogues: int = 400) -> Path:
    model, tokenizer = MediRound.from_pretrained(checkpoint)
    if beta is not None:
        model.config.jcm.beta = float(beta)
    dest = bundled_folder(model.config.size) if dest is None else Path(dest)
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, tokenizer, storage_dtype=torch.float16, against_bases=True)
        scorer = ReferenceScorer.from_pretrained(checkpoint)
        if scorer is None and dest.is_dir():
            scorer = ReferenceScorer.from_pretrained(dest)  # keep the reference scorer the folder had
        if scorer is not None:
            scorer.save_pretrained(tmp)
        finder = LesionFinder.from_pretrained(checkpoint)
        if finder is None and dest.is_dir():
            finder = LesionFinder.from_pretrained(dest)  # the folder's, if trained on this model's encoder
            if finder is not None and finder.config.encoder != encoder_fingerprint(model):
                print(f"the lesion finder in {dest} was trained on another segmenter encoder and is not kept: "
                      "retrain it (python -m MediRoundCore.train.lesion_finder)")
                finder = None
        if finder is not None:
            finder.save_pretrained(tmp)
        drafts = Path(checkpoint) / DRAFTS_FILE
        if drafts.is_file():
            shutil.copyfile(drafts, tmp / DRAFTS_FILE)
        elif drafts_dialogues > 0:
            build_for_checkpoint(tmp, drafts_dialogues)

    return write_folder(dest, write, inputs=(checkpoint,))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--dest", help="the folder to write (default: the bundled folder of the checkpoint's size, "
                   "MediRoundCore/weights/mediround-<size>)")
    p.add_argument("--beta", type=float)
    p.add_argument("--drafts-dialogues", type=int, default=400,
                   help="training dialogues the answer drafts are made from, when the checkpoint has none (400)")
    args = p.parse_args(argv)
    print(export_default(args.checkpoint, args.dest, args.beta, args.drafts_dialogues))


if __name__ == "__main__":
    main()
