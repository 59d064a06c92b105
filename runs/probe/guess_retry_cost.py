"""Probe (session 43): what the guessed-reference retries cost. Hard split, `resolver+jcm`: the share of later
rounds that asked more than one guess (an absent answer inside the guess, or a structure another round drew), and
the engine's time for them against the rounds that asked once.

    .venv/bin/python runs/probe/guess_retry_cost.py [--n 60]
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
    by_tries: dict[int, list[float]] = {}
    for sample, i in zip(samples, ids):
        run = evaluate_dialogue(engine, sample, CONFIGS["resolver+jcm"], i)
        for rnd in run.session.rounds[1:]:
            tries = int(rnd.timings.get("reference_tries", 1))
            by_tries.setdefault(tries, []).append(rnd.timings["total_ms"])
        engine.end_dialogue([run.session])
    total = sum(len(v) for v in by_tries.values())
    for tries, ms in sorted(by_tries.items()):
        ms = np.array(ms)
        print(f"{tries} answer(s): {len(ms)} of {total} later rounds ({100 * len(ms) / total:.1f} %); engine time "
              f"median {np.median(ms):.0f} ms, 95th percentile {np.percentile(ms, 95):.0f} ms")


if __name__ == "__main__":
    main()
