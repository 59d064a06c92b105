"""Probe: when the product's resolver picks another round than the dataset's, what does the shipped model answer?
Hard split, `resolver+jcm`: for rounds resolved right and wrong, the share answered "not on this slice", the mean
JCM score and Dice. (Does the model's own answer tell a wrong reference, so that the next candidate could be
tried?)

    PYTHONPATH=$PWD python runs/probe/lite_wrong_reference_answers.py [--n 60]
"""

import argparse

import numpy as np
import torch

from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import CONFIGS, EvalEngine, evaluate_dialogue
from MediRoundCore.evaluate.run import default_cache, ensure_split, load_samples


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(2)
    samples, ids = load_samples(ensure_split("hard", 0, args.n, default_cache()), args.n)
    engine = EvalEngine.from_engine(Engine.load())
    rows = {True: [], False: []}
    for sample, i in zip(samples, ids):
        run = evaluate_dialogue(engine, sample, CONFIGS["resolver+jcm"], i)
        for rec, rnd in zip(run.records, run.session.rounds):
            if rec.gt_reference is None or rec.round == 1:
                continue
            rows[rec.reference == rec.gt_reference].append((rnd.absent, rec.jcm_score or 0.0, rec.dice, rec.relation))
        engine.end_dialogue([run.session])
    for right, r in rows.items():
        absent, score, dice = (np.array([x[k] for x in r], float) for k in range(3))
        print(f"resolver {'right' if right else 'wrong'}: {len(r)} rounds; answered absent {100 * absent.mean():.1f} %;"
              f" JCM score {score.mean():.3f}; Dice {100 * dice.mean():.1f}; Dice < 0.5 in {100 * (dice < 0.5).mean():.1f} %")
    wrong = rows[False]
    for rel in sorted({x[3] for x in wrong}, key=str):
        d = [x[2] for x in wrong if x[3] == rel]
        print(f"   wrong, {rel}: {len(d)} rounds, Dice {100 * np.mean(d):.1f}")


if __name__ == "__main__":
    main()
