"""Probe: on "inside it" rounds (lesion and hierarchy relations) whose reference the product must guess, do
the model's outputs tell the right container from a wrong one?

Hard split, dataset references for the rounds before. At each lesion/hierarchy round that names no round, ask
Lite with each of the reference scorer's top three candidates and record per candidate: mask area, JCM score,
the share of the mask inside the candidate's mask, whether it answered absent, and Dice against the truth.
Prints how often each signal picks the dataset's reference, and the first rounds.

    .venv/bin/python runs/probe/lite_container_evidence.py [--n 60]
"""
import argparse

import numpy as np
import torch

from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image
from MediRoundCore.references import named_round
from MediRoundCore.session import Session


def dice(a, b):
    d = a.sum() + b.sum()
    return 1.0 if d == 0 else 2 * (a & b).sum() / d


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--top", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = Engine.load(device="cpu")
    scorer = engine.reference_scorer
    rows = []
    for i in range(args.n):
        dialogue = make_dialogue("hard", 0, i)
        sample = to_sample(dialogue)
        image = sample_image(sample)
        session = Session(sample_fingerprint(sample))
        for k, query in enumerate(sample.queries):
            truth = None if sample.ref_indices[k] is None else sample.ref_indices[k] + 1
            entities = session.entities
            relation = getattr(dialogue.rounds[k], "relation", None)
            if (k > 0 and truth is not None and relation in ("lesion", "hierarchy")
                    and named_round(query, entities) is None):
                order = [int(c) + 1 for c in np.argsort(-scorer.scores(query, entities))[:args.top]]
                trial = []
                for cand in order:
                    r = engine.ask(session, query, image, reference=cand).round
                    container = session.rounds[cand - 1].mask
                    inside = float((r.mask & container).sum() / max(r.mask.sum(), 1))
                    trial.append(dict(cand=cand, jcm=r.jcm_score or 0.0, area=int(r.mask.sum()), inside=inside,
                                      absent=r.absent, dice=dice(r.mask, np.asarray(sample.masks[k], bool)),
                                      entity=r.entity))
                    session.undo()
                rows.append((relation, truth, query, list(entities), trial))
            engine.ask(session, query, image, reference=truth)
        print(i, len(rows), flush=True)
    for relation in ("lesion", "hierarchy"):
        sel = [r for r in rows if r[0] == relation]
        n = len(sel)
        intop = [r for r in sel if r[1] in [t["cand"] for t in r[4]]]
        pick = lambda key: sum(max(t, key=key)["cand"] == truth for _, truth, _, _, t in intop)
        top1 = sum(r[4][0]["cand"] == r[1] for r in sel)
        print(f"{relation}: {n} rounds, truth in top {args.top}: {len(intop)}; top-1 {top1}; "
              f"higher JCM {pick(lambda t: t['jcm'])}; larger mask {pick(lambda t: t['area'])}; "
              f"most inside {pick(lambda t: t['inside'] * (t['area'] > 0))}; "
              f"first not absent {sum(next((t['cand'] for t in r[4] if not t['absent']), None) == r[1] for r in intop)}; "
              f"best Dice {pick(lambda t: t['dice'])}")
        print("  mean Dice top-1", np.mean([r[4][0]["dice"] for r in sel]) if sel else 0,
              "oracle", np.mean([max(t["dice"] for t in r[4]) for r in sel]) if sel else 0)
    for relation, truth, query, entities, trial in rows[:40]:
        if trial[0]["cand"] != truth:
            print(relation, repr(query), entities, "truth", truth)
            for t in trial:
                print("    ", t["cand"], entities[t["cand"] - 1], "jcm %.3f area %d inside %.2f absent %s dice %.2f %s"
                      % (t["jcm"], t["area"], t["inside"], t["absent"], t["dice"], t["entity"]))


if __name__ == "__main__":
    main()
