"""Probe (issue 23, product references; lead from session 41): can a small head on the segmenter's image
embedding tell whether an organ holds a lesion, and so pick "it" in "the nodule within it" after both lungs?

Train: organs that host lesions in the generator (data/empty_containers.HOST_NOUNS) on train-split slices, each
with its ground-truth mask; features are the frozen LiteMedSAM embedding's mean and max over the mask's cells;
label: a lesion of the slice lies in it. A logistic regression (torch, full batch). Test: hard-split lesion
rounds that name no round; the model's own masks of the earlier rounds (dataset references); among the
scorer's top three, the candidate the head rates likeliest, or the scorer's probability times the head's.

    .venv/bin/python runs/probe/lesion_presence_head.py [--train 200] [--test 40]
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from MediRoundCore.data.empty_containers import HOST_NOUNS
from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image
from MediRoundCore.model.processing import masks_to_segmenter_frame
from MediRoundCore.references import named_round
from MediRoundCore.session import Session


def organ_features(engine, session, image, mask):
    """Mean and max of the segmenter embedding (256, g, g) over the cells `mask` (display slice) covers."""
    state = engine._slice_state(session, image, {}, None)
    size = engine.model.config.segmenter.image_size
    frame = masks_to_segmenter_frame(state.padding.pad(mask)[None], state.input_hw, size)  # (1,S,S)
    emb = state.seg_embedding[0].float()  # (C,g,g)
    w = F.adaptive_avg_pool2d(frame[None], emb.shape[-2:])[0, 0]  # (g,g) share of each cell inside
    if w.sum() < 1e-6:
        return None
    mean = (emb * w).sum((1, 2)) / w.sum()
    inside = w > 0.5
    peak = emb[:, inside].amax(1) if inside.any() else mean
    return torch.cat([mean, peak]).numpy()


def fit(X, y, l2):
    """Logistic regression on standardised features, classes weighted equally; returns raw features → logit."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    linear = torch.nn.Linear(X.shape[1], 1)
    weight = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(linear((X - mu) / sd)[:, 0], y, weight=weight) \
            + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda Z: linear((Z - mu) / sd).detach()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--test", type=int, default=40)
    p.add_argument("--l2", type=float, default=0.1, help="weight decay of the logistic regression (standardised features)")
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = Engine.load(device="cpu")
    X, y = [], []
    with torch.inference_mode():
        for i in range(args.train):
            dialogue = make_dialogue("train", 0, i)
            sample = to_sample(dialogue)
            image, sl = sample_image(sample), dialogue.slice
            session = Session(sample_fingerprint(sample))
            with_lesion = {inst.parent for inst in sl.instances if inst.kind == "lesion"}
            for inst in sl.instances:
                if inst.kind == "organ" and inst.noun in HOST_NOUNS:
                    f = organ_features(engine, session, image, np.asarray(inst.mask, bool))
                    if f is not None:
                        X.append(f)
                        y.append(float(inst.name in with_lesion))
            engine.forget()
    X, y = torch.tensor(np.array(X)), torch.tensor(y)
    held = torch.arange(len(y)) % 5 == 0  # a fifth held out, to say whether the head generalises
    head = fit(X[~held], y[~held], args.l2)
    with torch.no_grad():
        acc = ((head(X[held])[:, 0] > 0).float() == y[held]).float().mean()
    print(f"held-out organs {int(held.sum())}: accuracy {acc:.3f} (all 'lesion': {y[held].mean():.3f})", flush=True)
    head = fit(X, y, args.l2)
    mu, sd = torch.zeros(X.shape[1]), torch.ones(X.shape[1])  # fit() standardises inside the head
    print(f"train: {len(y)} organs, {int(y.sum())} with a lesion", flush=True)

    scorer = engine.reference_scorer
    right = {"scorer": 0, "head": 0, "both": 0}
    n = 0
    with torch.inference_mode():
        for i in range(args.test):
            dialogue = make_dialogue("hard", 0, i)
            sample = to_sample(dialogue)
            image = sample_image(sample)
            session = Session(sample_fingerprint(sample))
            for k, query in enumerate(sample.queries):
                truth = None if sample.ref_indices[k] is None else sample.ref_indices[k] + 1
                entities = session.entities
                if (k > 0 and truth is not None and getattr(dialogue.rounds[k], "relation", None) == "lesion"
                        and named_round(query, entities) is None):
                    scores = scorer.scores(query, entities).astype(np.float64)
                    prob = np.exp(scores - scores.max())
                    prob /= prob.sum()
                    order = [int(c) + 1 for c in np.argsort(-scores)[:3]]
                    presence = []
                    for c in order:
                        f = organ_features(engine, session, image, session.rounds[c - 1].mask)
                        presence.append(0.0 if f is None else
                                        float(torch.sigmoid(head((torch.tensor(f) - mu) / sd))[0]))
                    n += 1
                    right["scorer"] += order[0] == truth
                    right["head"] += order[int(np.argmax(presence))] == truth
                    right["both"] += order[int(np.argmax([prob[c - 1] * q for c, q in zip(order, presence)]))] == truth
                engine.ask(session, query, image, reference=truth)
            engine.forget()
            print(i, n, right, flush=True)
    print(f"hard lesion rounds {n}: right with the scorer {right['scorer']}, the head {right['head']}, "
          f"scorer × head {right['both']}")


if __name__ == "__main__":
    main()
