"""Probe (issue 23): does LiteMedSAM, prompted with the box of a mask the shipped model answered, give a better
mask than the answer itself? On the real labelled scans (the evaluator's real set, a user's Ask path) and on
generated hard-split dialogues (dataset references). Prints Dice per round: the answer, and LiteMedSAM in the
answer's box grown by 0 / 2 / 4 frame pixels; nothing is written.

    PYTHONPATH=$PWD python runs/probe/box_refine.py [--hard 20]
"""

import argparse

import numpy as np
import torch

from MediRoundCore.checkpoints.lite_medsam import load_lite_medsam
from MediRoundCore.data.real_validation import real_samples
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import EvalEngine, evaluate_dialogue, parse_configs
from MediRoundCore.model.box_prompt import segment_in_box
from MediRoundCore.model.config import lite_segmenter_config, tiny_config
from MediRoundCore.model.modeling import build_segmenter
from MediRoundCore.model.processing import segmenter_pixels

MARGINS = (0, 2, 4)


def dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def refine(segmenter, cfg, image01, masks):
    seg_pixels, input_hw = segmenter_pixels(image01.astype(np.float32), cfg)
    with torch.inference_mode():
        embedding = segmenter.image_encoder(seg_pixels[None])
    out = []
    for mask in masks:
        if mask is None or not mask.any():
            out.append({m: None for m in MARGINS})
        else:
            out.append({m: segment_in_box(segmenter, embedding, input_hw, mask, m) for m in MARGINS})
    return out


def probe(name, samples, engine, segmenter, cfg):
    config = parse_configs(["ind+jcm"])[0]
    rows = []
    for i, sample in enumerate(samples):
        run = evaluate_dialogue(engine, sample, config, f"{name}{i}")
        answers = [r.mask for r in run.session.rounds]
        refined = refine(segmenter, cfg, np.asarray(sample.image), answers)
        for k, (answer, truth, ref) in enumerate(zip(answers, np.asarray(sample.masks, bool), refined)):
            base = dice(answer, truth) if answer is not None else 0.0
            scores = {m: (dice(r, truth) if r is not None else base) for m, r in ref.items()}
            rows.append((base, scores))
            label = sample.entities[k] if k < len(sample.entities) else "?"
            print(f"{name} {i} round {k + 1} {label}: answer {base:.3f}  "
                  + "  ".join(f"box+{m} {s:.3f}" for m, s in scores.items()), flush=True)
    base = np.mean([r[0] for r in rows])
    print(f"== {name}: {len(rows)} rounds, answer {base:.3f}, "
          + ", ".join(f"box+{m} {np.mean([r[1][m] for r in rows]):.3f}" for m in MARGINS), flush=True)


def pretrained_lite_medsam():
    """The pretrained LiteMedSAM segmenter (pinned weights) and a config that places slices for it."""
    cfg = tiny_config()
    cfg.segmenter = lite_segmenter_config()
    segmenter = build_segmenter(cfg.segmenter).eval()
    load_lite_medsam(segmenter)
    return segmenter, cfg


def hard_samples(seed: int, count: int):
    """The first `count` dialogues of the hard split drawn with `seed`, from the evaluator's cache."""
    from pathlib import Path

    from MediRoundCore.evaluate.run import ensure_split, load_samples
    folder = ensure_split("hard", seed, count, Path.home() / ".cache/mediround/splits")
    return load_samples(folder, count)[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hard", type=int, default=20, help="hard-split dialogues (seed 0)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = EvalEngine.from_engine(Engine.load(device="cpu"))
    segmenter, cfg = pretrained_lite_medsam()
    probe("real", real_samples(), engine, segmenter, cfg)
    if args.hard:
        probe("hard", hard_samples(0, args.hard), engine, segmenter, cfg)


if __name__ == "__main__":
    main()
