"""Probe (issue 23, session 48): move a lesion answer that lies where the lesion finder sees no lesion to the
finder's largest spot? For every round whose answer names a lesion and draws a mask: if no cell under the mask is
above LOW for the kinds the answer names, and the finder has a spot (touching cells above SPOT, at least
MIN_CELLS) inside the referenced round's mask (or anywhere in the field for a round with no reference) that the
mask does not touch, the spot's box goes to LiteMedSAM's mask decoder (the pretrained one, and the model's own).
Prints Dice before and after per moved round, and the totals; on the real set and on hard-split dialogues
(dataset references; seed 1, the analysis split). Nothing is written.

    PYTHONPATH=$PWD python runs/probe/lesion_relocate.py [--hard 40]
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from MediRoundCore.data.real_validation import real_samples
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import EvalEngine, evaluate_dialogue, parse_configs, sample_image
from MediRoundCore.lesion_finder import _lesion_words, _touching_groups, _words, names_a_lesion
from MediRoundCore.model.box_prompt import segment_in_box
from MediRoundCore.model.processing import logits_to_slice, masks_to_segmenter_frame

from box_refine import hard_samples, pretrained_lite_medsam  # runs/probe, the script's folder

LOW, SPOT, MIN_CELLS = 0.5, 0.9, 2


def dice(a, b):
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum())) if (a.any() or b.any()) else 1.0


def cover_cells(state, mask, size, g):
    frame = masks_to_segmenter_frame(state.padding.pad(mask)[None], state.input_hw, size)
    cover = F.adaptive_avg_pool2d(frame[:, None].float(), (g, g))[0, 0]
    cells = cover >= 0.5
    return (cells if cells.any() else cover > 0).numpy()


def draw_in_spot_box(segmenter, state, spot, size, shape, margin=2):
    """The segmenter's mask (slice resolution, unpadded) for the box around `spot`, cells (y, x) of the segmenter
    embedding's grid; `shape` is the padded slice's."""
    g = state.seg_embedding.shape[-1]
    grid = np.zeros((g, g), np.float32)
    for y, x in spot:
        grid[y, x] = 1.0
    label = logits_to_slice(torch.from_numpy(grid)[None, None] * 20 - 10, state.input_hw, size, shape)[0].numpy() > 0
    with torch.inference_mode():
        return state.padding.unpad(segment_in_box(segmenter, state.seg_embedding.float(), state.input_hw, label,
                                                  margin))


def relocate(engine, decoders, session, image, k, verbose=False):
    """None, or {name: moved mask} for round k of the session (0-based)."""
    rnd = session.rounds[k]
    finder = engine.lesion_finder
    if rnd.mask is None or not rnd.mask.any() or not names_a_lesion(rnd.entity):
        return None
    named = [kind for kinds in _lesion_words(_words(rnd.entity)) for kind in kinds]  # side words are no veto here
    kinds = tuple(x for x in dict.fromkeys(named) if x in finder.config.kinds)
    if not kinds:
        return None
    state = engine._slice_state(session, image, {}, None)
    size, g = engine.model.config.segmenter.image_size, state.seg_embedding.shape[-1]
    with torch.inference_mode():
        probs = F.softmax(finder(state.seg_embedding[0].float()[None]), 1)[0].numpy()
    p = probs[[1 + finder.config.kinds.index(x) for x in kinds]].sum(0)
    drawn = cover_cells(state, rnd.mask, size, g)
    if verbose:
        print(f"   R{k + 1} {rnd.entity!r}: strongest under the answer {p[drawn].max():.2f} ({int(drawn.sum())} cells)")
    if p[drawn].max() >= LOW:
        return None
    if rnd.reference is not None:
        region = cover_cells(state, session.rounds[rnd.reference - 1].mask, size, g)
    else:
        region = cover_cells(state, np.ones_like(rnd.mask), size, g)
    spots = [s for s in _touching_groups(np.argwhere(region & (p > SPOT))) if len(s) >= MIN_CELLS]
    spots = [s for s in spots if not any(drawn[y, x] for y, x in s)]
    if not spots:
        return None
    shape = state.padding.pad(rnd.mask).shape
    return {name: draw_in_spot_box(segmenter, state, max(spots, key=len), size, shape)
            for name, segmenter in decoders.items()}


def probe(label, samples, engine, decoders, verbose=False):
    config = parse_configs(["ind+jcm"])[0]
    total = {"rounds": 0, "lesion rounds": 0, "moved": 0, "before": 0.0, **{n: 0.0 for n in decoders}}
    for i, sample in enumerate(samples):
        run = evaluate_dialogue(engine, sample, config, f"{label}{i}")
        image = sample_image(sample)
        truths = np.asarray(sample.masks, bool)
        for k, rnd in enumerate(run.session.rounds):
            total["rounds"] += 1
            total["lesion rounds"] += names_a_lesion(rnd.entity)
            moved = relocate(engine, decoders, run.session, image, k, verbose)
            if moved is None:
                continue
            before = dice(rnd.mask, truths[k])
            after = {n: dice(m, truths[k]) for n, m in moved.items()}
            total["moved"] += 1
            total["before"] += before
            for n, v in after.items():
                total[n] += v
            print(f"{label} {i} round {k + 1} {rnd.entity!r} ref R{rnd.reference}: Dice {before:.3f} -> "
                  + ", ".join(f"{n} {v:.3f}" for n, v in after.items()), flush=True)
        engine.forget()
    print(f"== {label}: {total}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hard", type=int, default=40, help="hard-split dialogues (seed 1)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = EvalEngine.from_engine(Engine.load(device="cpu"))
    decoders = {"pretrained": pretrained_lite_medsam()[0], "ours": engine.model.segmenter}
    probe("real", real_samples(), engine, decoders, verbose=True)
    if args.hard:
        probe("hard", hard_samples(1, args.hard), engine, decoders)


if __name__ == "__main__":
    main()
