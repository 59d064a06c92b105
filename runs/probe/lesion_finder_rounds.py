"""Probe (issue 23): at lesion rounds that name no round, what the lesion finder says of each earlier round.

Val-split dialogues asked with the dataset's references (the model's own masks of earlier rounds); at each lesion
round whose reference is a guess, prints the scorer's probability and the finder's presence of the asked kind for
each candidate, which candidates truly host a lesion of the asked noun, and the dataset's round.

    .venv/bin/python runs/probe/lesion_finder_rounds.py --finder /tmp/lf_v1 [--n 150]
"""
import argparse

import numpy as np
import torch

from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image
from MediRoundCore.lesion_finder import LesionFinder, lesion_kinds_asked
from MediRoundCore.model.processing import masks_to_segmenter_frame
from MediRoundCore.references import is_guess
from MediRoundCore.session import Session


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--finder", required=True)
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--split", default="val")
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = Engine.load(device="cpu")
    finder = LesionFinder.from_pretrained(args.finder)
    counts = {"rounds": 0, "scorer": 0, "product": 0, "oracle": 0}
    with torch.inference_mode():
        for i in range(args.n):
            dialogue = make_dialogue(args.split, 0, i)
            sample = to_sample(dialogue)
            image = sample_image(sample)
            session = Session(sample_fingerprint(sample))
            for k, query in enumerate(sample.queries):
                truth = None if sample.ref_indices[k] is None else sample.ref_indices[k] + 1
                rnd = dialogue.rounds[k]
                if rnd.relation == "lesion" and truth is not None and is_guess(query, session.entities):
                    state = engine._slice_state(session, image, {}, None)
                    scores = engine.reference_scorer.scores(query, session.entities).astype(np.float64)
                    prob = np.exp(scores - scores.max())
                    prob /= prob.sum()
                    masks = np.stack([state.padding.pad(r.mask) for r in session.rounds])
                    frames = masks_to_segmenter_frame(masks, state.input_hw, engine.model.config.segmenter.image_size)
                    kind = lesion_kinds_asked(query)
                    presence = (np.ones(len(frames)) if kind is None
                                else finder.presence(state.seg_embedding, frames, kind))
                    target = dialogue.slice.instance(rnd.target)
                    hosts = {r + 1 for r, d in enumerate(dialogue.rounds[:k]) if any(
                        x.parent == d.target and x.kind == "lesion" and x.noun == target.noun
                        for x in dialogue.slice.instances)}
                    combined = prob * np.clip(presence, 0.01, 1)
                    counts["rounds"] += 1
                    counts["scorer"] += int(np.argmax(prob)) + 1 == truth
                    counts["product"] += int(np.argmax(combined)) + 1 == truth
                    ordered = [c for c in np.argsort(-prob) if c + 1 in hosts]
                    counts["oracle"] += bool(ordered) and ordered[0] + 1 == truth
                    if int(np.argmax(prob)) + 1 != truth or int(np.argmax(combined)) + 1 != truth:
                        print(f"{i}/{k + 1} {query!r} kind={kind} dataset R{truth} hosts {sorted(hosts)}")
                        for c in np.argsort(-prob)[:4]:
                            print(f"    R{c + 1} {session.entities[c]!r:28} p={prob[c]:.2f} presence={presence[c]:.2f}")
                engine.ask(session, query, image, reference=truth)
            engine.forget()
    print(counts)


if __name__ == "__main__":
    main()
