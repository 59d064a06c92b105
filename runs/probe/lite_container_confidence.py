"""Probe (issue 23, product references): on "inside it" rounds (lesion, hierarchy) whose reference the product
must guess, do image-side signals tell the dataset's container from the scorer's other guesses?

Hard split, dataset references for the rounds before. At each such round, for each of the scorer's top three:
the mask decoder's confidence (mean sigmoid of the low-res logits over the mask, peak logit), and the share of
a reference-free mask (the same query asked with a blank crop/box, `noref`) inside the candidate's mask.
Prints how often each signal, alone or as a tie-break after the scorer, picks the dataset's reference.

    .venv/bin/python runs/probe/lite_container_confidence.py [--n 60]
"""
import argparse

import numpy as np
import torch

import MediRoundCore.engine as engine_module
from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import EvalEngine, parse_configs, sample_fingerprint, sample_image
from MediRoundCore.references import named_round
from MediRoundCore.session import Session

captured = {}
_to_slice = engine_module.logits_to_slice


def _capture(logits, *args, **kwargs):
    captured["low"] = logits.detach().float().clone()
    return _to_slice(logits, *args, **kwargs)


engine_module.logits_to_slice = _capture


def dice(a, b):
    d = a.sum() + b.sum()
    return 1.0 if d == 0 else 2 * (a & b).sum() / d


def confidence(logits):
    low = logits[0, 0] if logits.dim() == 4 else logits[0]
    inside = low > 0
    if not inside.any():
        return 0.0, float(low.max())
    return float(torch.sigmoid(low[inside]).mean()), float(low.max())


def contrast(pixels, mask, width=3):
    """|mean inside − mean of a ring around| / std of the ring: how much the mask stands out from its surround."""
    from scipy import ndimage
    if not mask.any():
        return 0.0
    ring = ndimage.binary_dilation(mask, iterations=width) & ~mask
    if not ring.any():
        return 0.0
    return float(abs(pixels[mask].mean() - pixels[ring].mean()) / (pixels[ring].std() + 1e-3))


def heterogeneity(pixels, mask):
    """Share of the organ's pixels (holes filled) more than 3 robust deviations from its median intensity: a
    lesion of another density makes the organ's histogram carry a second mode."""
    from scipy import ndimage
    region = ndimage.binary_fill_holes(mask)
    if region.sum() < 20:
        return 0.0
    values = pixels[region]
    median = np.median(values)
    mad = np.median(np.abs(values - median)) * 1.4826 + 1e-3
    return float((np.abs(values - median) > 3 * mad).mean())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--top", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = EvalEngine.from_engine(Engine.load(device="cpu"))
    noref = parse_configs(["noref"])[0]
    scorer = engine.reference_scorer
    rows = []
    for i in range(args.n):
        dialogue = make_dialogue("hard", 0, i)
        sample = to_sample(dialogue)
        image = sample_image(sample)
        pixels = np.asarray(image.pixels, np.float32)
        session = Session(sample_fingerprint(sample))
        for k, query in enumerate(sample.queries):
            truth = None if sample.ref_indices[k] is None else sample.ref_indices[k] + 1
            entities = session.entities
            relation = getattr(dialogue.rounds[k], "relation", None)
            if (k > 0 and truth is not None and relation in ("lesion", "hierarchy")
                    and named_round(query, entities) is None):
                order = [int(c) + 1 for c in np.argsort(-scorer.scores(query, entities))[:args.top]]
                with engine.mode(noref):
                    free = engine.ask(session, query, image, reference=truth).round.mask
                    session.undo()
                target = np.asarray(sample.masks[k], bool)
                trial = []
                for cand in order:
                    r = engine.ask(session, query, image, reference=cand).round
                    mean_p, peak = confidence(captured["low"]) if not r.absent else (0.0, -99.0)
                    container = session.rounds[cand - 1].mask
                    trial.append(dict(cand=cand, mean_p=mean_p, peak=peak,
                                      free_inside=float((free & container).sum() / max(free.sum(), 1)),
                                      dice=dice(r.mask, target), jcm=r.jcm_score or 0.0,
                                      contrast=contrast(pixels, r.mask),
                                      hetero=heterogeneity(pixels, container)))
                    session.undo()
                rows.append((relation, truth, query, list(entities), trial, dice(free, target)))
            engine.ask(session, query, image, reference=truth)
        print(i, len(rows), flush=True)
    for relation in ("lesion", "hierarchy"):
        sel = [r for r in rows if r[0] == relation]
        intop = [r for r in sel if r[1] in [t["cand"] for t in r[4]]]
        pick = lambda key: sum(max(t, key=key)["cand"] == r[1] for r in intop for t in [r[4]])
        top1 = sum(r[4][0]["cand"] == r[1] for r in sel)
        print(f"{relation}: {len(sel)} rounds, truth in top {args.top}: {len(intop)}; scorer top-1 {top1}; "
              f"mean p {pick(lambda t: t['mean_p'])}; peak {pick(lambda t: t['peak'])}; "
              f"noref inside {pick(lambda t: t['free_inside'])}; contrast {pick(lambda t: t['contrast'])}; organ heterogeneity {pick(lambda t: t['hetero'])}; jcm {pick(lambda t: t['jcm'])}; "
              f"best Dice {pick(lambda t: t['dice'])}")
        # tie-break: move off the scorer's pick only when the reference-free mask lies mostly in another candidate
        for th in (0.5, 0.7, 0.9):
            chosen = []
            for r in sel:
                t = r[4]
                best = max(t, key=lambda x: x["free_inside"])
                c = best if best["free_inside"] >= th and t[0]["free_inside"] < 0.5 else t[0]
                chosen.append(c)
            right = sum(c["cand"] == r[1] for c, r in zip(chosen, sel))
            print(f"  noref tie-break th {th}: right {right}, mean Dice {np.mean([c['dice'] for c in chosen]):.3f}"
                  f" (scorer {np.mean([r[4][0]['dice'] for r in sel]):.3f}, noref mask itself "
                  f"{np.mean([r[5] for r in sel]):.3f}, oracle {np.mean([max(x['dice'] for x in r[4]) for r in sel]):.3f})")
    for relation, truth, query, entities, trial, free_d in rows[:30]:
        if trial[0]["cand"] != truth:
            print(relation, repr(query), entities, "truth", truth, "noref dice %.2f" % free_d)
            for t in trial:
                print("    ", t["cand"], entities[t["cand"] - 1],
                      "mean_p %.3f peak %.2f free_inside %.2f contrast %.2f hetero %.3f jcm %.3f dice %.2f"
                      % (t["mean_p"], t["peak"], t["free_inside"], t["contrast"], t["hetero"], t["jcm"], t["dice"]))


if __name__ == "__main__":
    main()
