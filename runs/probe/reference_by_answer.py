"""Probe (issue 23, product references): when the resolver's reference is not the dataset's, does the model's own
answer without a reference (`noref`: blank crop/box) name the structure that holds the target, and so the round
to refer to? Hard split, seed 0; for every later round with a dataset reference: the resolver's pick, the noref
answer's entity, the round whose entity is that answer's container ("X in the Y" → the latest round named Y).
Prints counts; nothing is written.

    PYTHONPATH=$PWD python runs/probe/reference_by_answer.py [N]
"""

import re
import sys
from pathlib import Path

import torch

from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import EvalEngine, evaluate_dialogue, parse_configs
from MediRoundCore.evaluate.run import ensure_split, load_samples


def container(entity: str) -> str | None:
    m = re.search(r"\b(?:in|inside|within|of) the (.+)$", (entity or "").strip().lower())
    return m.group(1) if m else None


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    torch.set_num_threads(2)
    engine = EvalEngine.from_engine(Engine.load(device="cpu"))
    samples, _ = load_samples(ensure_split("hard", 0, n, Path.home() / ".cache/mediround/splits"), n)
    resolver, noref = parse_configs(["resolver+jcm,noref"])
    tally = dict(rounds=0, resolver_right=0, noref_names_container=0, container_is_dataset=0,
                 fixes=0, breaks=0, both_wrong=0)
    for i, sample in enumerate(samples):
        a = evaluate_dialogue(engine, sample, resolver, f"r{i}")
        b = evaluate_dialogue(engine, sample, noref, f"n{i}")
        truth_entities = list(sample.entities)
        for k in range(1, sample.num_rounds):
            gt = sample.ref_indices[k]
            if gt is None:
                continue
            gt = int(gt) + 1
            tally["rounds"] += 1
            picked = a.records[k].reference
            right = picked == gt
            tally["resolver_right"] += right
            box = container(b.session.rounds[k].entity)
            if box is None:
                continue
            tally["noref_names_container"] += 1
            named = [j + 1 for j in range(k) if truth_entities[j].lower() == box]
            choice = named[-1] if named else None
            if choice is None:
                continue
            tally["container_is_dataset"] += choice == gt
            if not right and choice == gt:
                tally["fixes"] += 1
            elif right and choice != gt:
                tally["breaks"] += 1
            elif not right:
                tally["both_wrong"] += 1
        print(i, tally, flush=True)


if __name__ == "__main__":
    main()
