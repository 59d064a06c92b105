"""Probe (issue 23): is the shipped model's mask threshold (logit 0, SAM's) the best cut for its masks? Runs the
evaluator's `ind+jcm` protocol (dataset references; masks at logit 0 feed later rounds as always), keeps each
round's final logits at slice resolution, and scores every round again at other cuts. Prints Dice per relation
and per predicted-area bin for each cut; writes the per-round table (pickle) for rules tried offline.

    PYTHONPATH=$PWD python runs/probe/mask_threshold.py --split hard --seed 1 --dialogues 60 --out /tmp/thr.pkl
"""

import argparse
import pickle
from pathlib import Path

import numpy as np
import torch

import MediRoundCore.engine as engine_module
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import EvalEngine, evaluate_dialogue, parse_configs, round_meta
from MediRoundCore.evaluate.run import ensure_split, load_samples

CUTS = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0)
AREA_BINS = (0, 64, 128, 256, 512, 1024, 10 ** 9)
_last = {}


def _recording(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        _last["logits"] = out[0].float().cpu().numpy()
        return out
    return wrapped


class RecordingEngine(EvalEngine):
    """The evaluator's engine, keeping each round's slice-resolution logits (None for an absent answer)."""
    kept: list

    def ask(self, *args, **kwargs):
        _last.clear()
        result = super().ask(*args, **kwargs)
        self.kept.append(_last.get("logits"))
        return result


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * (a & b).sum() / s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--split", default="hard")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dialogues", type=int, default=60)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    assert not (args.split == "hard" and args.seed == 0), "seed 0 is the reported draw: never probe on it"
    torch.set_num_threads(2)
    engine_module.logits_to_slice = _recording(engine_module.logits_to_slice)
    base = Engine.load(args.checkpoint, device="cpu") if args.checkpoint else Engine.load(device="cpu")
    engine = RecordingEngine.from_engine(base)
    folder = ensure_split(args.split, args.seed, args.dialogues, Path.home() / ".cache/mediround/splits")
    samples, ids = load_samples(folder, args.dialogues)
    config = parse_configs(["ind+jcm"])[0]
    rows = []
    for sample, did in zip(samples, ids):
        engine.kept = []
        run = evaluate_dialogue(engine, sample, config, did)
        truths = np.asarray(sample.masks, bool)
        for k, (rnd, logits) in enumerate(zip(run.session.rounds, engine.kept)):
            truth = truths[k]
            if logits is None or logits.shape != truth.shape:
                continue
            scores = {c: dice(logits > c, truth) for c in CUTS}
            rows.append(dict(dialogue=did, round=k + 1, relation=round_meta(sample, k).get("relation"),
                             entity=rnd.entity, pred_area=int((logits > 0).sum()), gt_area=int(truth.sum()),
                             peak=float(logits.max()), jcm=rnd.jcm_score, corrected=rnd.corrected, dice=scores))
    if args.out:
        Path(args.out).write_bytes(pickle.dumps(rows))
    print(f"{args.split} seed {args.seed}: {len(rows)} rounds of {len(samples)} dialogues")
    header = "group".ljust(22) + "".join(f"{c:>7.0f}" for c in CUTS)
    print(header)

    def line(name, group):
        if group:
            print(f"{name} ({len(group)})".ljust(22) + "".join(f"{100 * np.mean([r['dice'][c] for r in group]):7.1f}"
                                                          for c in CUTS))
    line("all", rows)
    for rel in sorted({r["relation"] or "-" for r in rows}):
        line(rel, [r for r in rows if (r["relation"] or "-") == rel])
    for lo, hi in zip(AREA_BINS, AREA_BINS[1:]):
        line(f"pred {lo}-{hi}", [r for r in rows if lo <= r["pred_area"] < hi])


if __name__ == "__main__":
    main()
