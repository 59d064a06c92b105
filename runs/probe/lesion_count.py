"""Probe (issue 23): can the lesion finder tell an organ with one lesion of a kind from one with two?

"The larger nodule inside it" can only mean an organ holding two nodules (the generator names a lesion by its kind
alone when it is the organ's only one of that kind, "larger/smaller" when there are two); "the nodule inside it"
one holding a single one. On hard-split seed 1 most wrong guesses at lesion rounds pick the other lung, which
holds a nodule too, but not the count the wording implies. For every lesion round whose reference is a guess
(val split, ground-truth masks of the earlier rounds), this stores per candidate round: the scorer's probability,
whether it is the dataset's round, the true number of lesions of the asked noun inside it, and the finder's
per-cell probabilities of the asked kinds over the cells its mask covers (with their grid positions), for
offline rules.

    .venv/bin/python runs/probe/lesion_count.py --n 200 --out /work/probe/lesion_count.pkl [--model DIR]
"""
import argparse
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image
from MediRoundCore.lesion_finder import lesion_kinds_asked
from MediRoundCore.model.processing import masks_to_segmenter_frame
from MediRoundCore.references import is_guess
from MediRoundCore.session import Round, Session


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--split", default="val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="model folder whose lesion finder and scorer to read (default: the shipped one)")
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = Engine.load(args.model, device="cpu")
    finder = engine.lesion_finder
    rows = []
    with torch.inference_mode():
        for i in range(args.n):
            dialogue = make_dialogue(args.split, args.seed, i)
            rounds = dialogue.rounds
            wanted = [k for k, r in enumerate(rounds) if r.relation == "lesion" and r.ref is not None
                      and lesion_kinds_asked(r.query) is not None
                      and is_guess(r.query, [x.entity for x in rounds[:k]])]
            if not wanted:
                continue
            sample = to_sample(dialogue)
            image = sample_image(sample)
            session = Session(sample_fingerprint(sample))
            state = engine._slice_state(session, image, {}, None)
            size = engine.model.config.segmenter.image_size
            masks = np.stack([state.padding.pad(np.asarray(m, bool)) for m in sample.masks])
            frames = masks_to_segmenter_frame(masks, state.input_hw, size)
            emb = state.seg_embedding[0].float().cpu()
            g = emb.shape[-1]
            probs = F.softmax(finder(emb[None]), 1)[0]  # (1+K, g, g)
            cover = F.adaptive_avg_pool2d(frames[:, None], (g, g))[:, 0]
            for k in wanted:
                r = rounds[k]
                kinds = [x for x in lesion_kinds_asked(r.query) if x in finder.config.kinds]
                pk = probs[[1 + finder.config.kinds.index(x) for x in kinds]].sum(0).numpy()
                target = dialogue.slice.instance(r.target)
                entities = [x.entity for x in rounds[:k]]
                scores = engine.reference_scorer.scores(r.query, entities).astype(np.float64)
                prob = np.exp(scores - scores.max())
                prob /= prob.sum()
                cands = []
                for j in range(k):
                    cells = (cover[j] >= 0.5).numpy()
                    if not cells.any():
                        cells = (cover[j] > 0).numpy()
                    host = rounds[j].target
                    n_true = sum(1 for x in dialogue.slice.instances
                                 if x.parent == host and x.kind == "lesion" and x.noun == target.noun)
                    ys, xs = np.nonzero(cells)
                    cands.append({"round": j + 1, "entity": entities[j], "p": float(prob[j]), "count": n_true,
                                  "lesion_round": rounds[j].relation == "lesion" or dialogue.slice.instance(host).kind == "lesion",
                                  "cells": np.stack([ys, xs, pk[ys, xs]], 1).astype(np.float32)})
                rows.append({"dialogue": i, "round": k + 1, "query": r.query, "truth": r.ref + 1,
                             "target": r.target, "candidates": cands})
            engine.forget()
            if i % 20 == 0:
                print(i, len(rows), flush=True)
    with open(args.out, "wb") as f:
        pickle.dump(rows, f)
    print(len(rows), "lesion rounds")


if __name__ == "__main__":
    main()
