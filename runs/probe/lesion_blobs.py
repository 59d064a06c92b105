"""Probe (issue 23): lesion answers whose mask holds two or more separate blobs. For every such round of the
evaluator's `ind+jcm` protocol (dataset references), the Dice of the whole mask and of each blob kept alone, with
what the engine could choose a blob by: its area, its mean and peak logit. Prints the Dice of each choice rule,
split by whether the answer names the lesion by size (those the engine already cuts to one blob:
mask_components.py; the table shows them as answered).

    PYTHONPATH=$PWD python runs/probe/lesion_blobs.py --seed 1 --dialogues 150 [--out rows.pkl]
"""

import argparse
import pickle
from pathlib import Path

import numpy as np
import torch

import MediRoundCore.engine as engine_module
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import evaluate_dialogue, parse_configs, round_meta
from MediRoundCore.evaluate.run import ensure_split, load_samples
from MediRoundCore.lesion_finder import names_a_lesion
from MediRoundCore.mask_components import lesion_sized_blobs, size_asked

from mask_threshold import RecordingEngine, _recording, dice


def blob_rows(run, sample, kept):
    truths = np.asarray(sample.masks, bool)
    for k, (rnd, logits) in enumerate(zip(run.session.rounds, kept)):
        if logits is None or not names_a_lesion(rnd.entity) or logits.shape != truths[k].shape:
            continue
        labels, counts, blobs = lesion_sized_blobs(rnd.mask)
        if len(blobs) < 2:
            continue
        yield dict(entity=rnd.entity, relation=round_meta(sample, k).get("relation"), size_word=size_asked(rnd.entity),
                   whole=dice(rnd.mask, truths[k]),
                   blobs=[dict(area=int(counts[b]), mean=float(logits[labels == b].mean()),
                               peak=float(logits[labels == b].max()), dice=dice(labels == b, truths[k]))
                          for b in blobs])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dialogues", type=int, default=150)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    assert args.seed != 0, "seed 0 is the reported draw: never probe on it"
    torch.set_num_threads(2)
    engine_module.logits_to_slice = _recording(engine_module.logits_to_slice)
    engine = RecordingEngine.from_engine(Engine.load(device="cpu"))
    folder = ensure_split("hard", args.seed, args.dialogues, Path.home() / ".cache/mediround/splits")
    samples, ids = load_samples(folder, args.dialogues)
    config = parse_configs(["ind+jcm"])[0]
    rows, lesion_rounds = [], 0
    for sample, did in zip(samples, ids):
        engine.kept = []
        run = evaluate_dialogue(engine, sample, config, did)
        lesion_rounds += sum(names_a_lesion(r.entity) for r in run.session.rounds)
        rows.extend(blob_rows(run, sample, engine.kept))
    if args.out:
        Path(args.out).write_bytes(pickle.dumps(rows))
    rules = {"whole": lambda r: r["whole"],
             "largest": lambda r: max(r["blobs"], key=lambda b: b["area"])["dice"],
             "smallest": lambda r: min(r["blobs"], key=lambda b: b["area"])["dice"],
             "mean logit": lambda r: max(r["blobs"], key=lambda b: b["mean"])["dice"],
             "peak logit": lambda r: max(r["blobs"], key=lambda b: b["peak"])["dice"],
             "best (oracle)": lambda r: max(b["dice"] for b in r["blobs"])}
    print(f"hard seed {args.seed}: {lesion_rounds} lesion answers, {len(rows)} with two or more blobs")
    for name, group in (("no size word", [r for r in rows if not r["size_word"]]),
                        ("size word", [r for r in rows if r["size_word"]])):
        print(f"{name} ({len(group)}): " + ", ".join(f"{k} {100 * np.mean([f(r) for r in group]):.1f}"
                                                    for k, f in rules.items() if group))


if __name__ == "__main__":
    main()
