"""Probe: can the model's own outputs choose between the reference scorer's two best candidates?

On val dialogues (dataset references for every round before), at each round whose query names no round and
where the scorer's top two differ, ask the shipped model with each of the two and record per candidate: the
JCM judgment score, the mask area, whether the answer's entity was already segmented, and the Dice against the
truth. Prints how often each signal picks the dataset's reference.

    .venv/bin/python runs/probe/reference_by_evidence.py [--n 40]
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
    p.add_argument("--n", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(1)
    engine = Engine.load(device="cpu")
    scorer = engine.reference_scorer
    rows = []
    for i in range(args.n):
        sample = to_sample(make_dialogue("val", 0, i))
        image = sample_image(sample)
        session = Session(sample_fingerprint(sample))
        for k, query in enumerate(sample.queries):
            truth = None if sample.ref_indices[k] is None else sample.ref_indices[k] + 1
            entities = session.entities
            if k > 0 and truth is not None and named_round(query, entities) is None:
                order = np.argsort(-scorer.scores(query, entities))[:2] + 1
                if len(order) == 2 and truth in order:
                    trial = []
                    for cand in order:
                        r = engine.ask(session, query, image, reference=int(cand)).round
                        already = (r.entity or "").lower() in [e.lower() for e in entities if e]
                        trial.append((int(cand), r.jcm_score, int(r.mask.sum()), already,
                                      dice(r.mask, np.asarray(sample.masks[k], bool))))
                        session.undo()
                    rows.append((truth, trial))
            engine.ask(session, query, image, reference=truth)
    n = len(rows)
    top1 = sum(t[0][0] == truth for truth, t in rows)
    jcm = sum(max(t, key=lambda x: x[1])[0] == truth for truth, t in rows)
    fresh = sum((t[0] if t[0][3] == t[1][3] else min(t, key=lambda x: x[3]))[0] == truth for truth, t in rows)
    best = sum(max(t, key=lambda x: x[4])[0] == truth for truth, t in rows)
    print(f"{n} rounds with the truth in the top two: scorer top-1 {top1}, higher JCM score {jcm}, "
          f"entity not yet segmented (else top-1) {fresh}, higher Dice {best}")
    for truth, t in rows[:30]:
        print(truth, [(c, round(s, 3), a, al, round(d, 2)) for c, s, a, al, d in t])


if __name__ == "__main__":
    main()
