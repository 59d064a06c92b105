"""Probe (issue 23, product references): how much to weigh the lesion finder against the reference scorer.

Runs the evaluator's resolver+jcm config on val-split dialogues (never the hard split: that one reports) with the
engine's lesion finder off, and on with its presence raised to each power in --weights (the engine multiplies
the scorer's probability by presence**w). Prints Dice overall and on lesion rounds, and how often the reference is
the dataset's round on lesion rounds.

    .venv/bin/python runs/probe/lesion_finder_weight.py --finder /tmp/lf_v1 [--n 120] [--weights 0.5 1 2]
"""
import argparse

import numpy as np
import torch

from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.metrics import summarize
from MediRoundCore.evaluate.protocol import EvalEngine, evaluate_sample, parse_configs
from MediRoundCore.lesion_finder import LesionFinder, lesion_kinds_asked


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--finder", required=True)
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--split", default="val")
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--changes", action="store_true", help="list the rounds whose Dice moved against the finder off")
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = EvalEngine.from_engine(Engine.load(device="cpu"))
    finder = LesionFinder.from_pretrained(args.finder)
    plain = finder.presence
    configs = parse_configs(["resolver+jcm"])
    samples = [to_sample(make_dialogue(args.split, 0, i)) for i in range(args.n)]
    if args.changes:  # only dialogues with a lesion word: the others cannot change
        samples = [s for s in samples if any(lesion_kinds_asked(q) is not None for q in s.queries)]
    baseline = None
    for w in [None] + args.weights:
        engine.lesion_finder = None if w is None else finder
        finder.presence = (lambda e, m, k, w=w: plain(e, m, k) ** w)
        records = []
        for i, s in enumerate(samples):
            for run in evaluate_sample(engine, s, configs, str(i)):  # ids index `samples`
                records += run.records
            engine.forget()
        if baseline is None:
            baseline = records
        elif args.changes:
            for a, b in zip(baseline, records):
                if abs(a.counts.dice - b.counts.dice) > 0.02:
                    q = samples[int(a.dialogue)].queries[a.round - 1]
                    print(f"  {a.dialogue}/{a.round} {a.relation}: ref {a.reference}->{b.reference} (dataset "
                          f"{a.gt_reference}) Dice {a.counts.dice:.2f}->{b.counts.dice:.2f}  {q!r}")
        lesion = [r for r in records if r.relation == "lesion"]
        right = np.mean([r.reference == r.gt_reference for r in lesion])
        print(f"weight {w}: Dice {summarize(r.counts for r in records).dice:.2f} ({len(records)} masks); lesion rounds "
              f"{summarize(r.counts for r in lesion).dice:.2f} ({len(lesion)}), dataset's reference {right:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
