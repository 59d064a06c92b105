"""Where a JCM correction could gain, on cached val rounds (the design notes quote its output).

    .venv/bin/python runs/probe/jcm_headroom.py --features runs/jcm/val_0.safetensors,runs/jcm/val_1.safetensors

1. How 1 − Dice splits over masks by their Dice, with their predicted/target area and target size.
2. Binarisation thresholds: mean Dice at a few logit thresholds, and with the best threshold chosen per mask
   using the ground truth (an upper bound for any "shrink or grow" fix).
3. Climbing the quality score: Adam steps on the prompt that raise the JCM score, and the Dice that follows.
4. With --teacher (the same dialogues collected teacher-forced, --reference-noise 0): Dice when every reference
   and the history are the ground truth's, against the on-policy rounds: all that undoing the accumulated
   errors of earlier rounds could give.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from MediRoundCore.evaluate.jcm_offline import hard_dice, offline_jcm
from MediRoundCore.model.modeling import MediRound, upsample_logits
from MediRoundCore.train.jcm_features import FeatureSet

THRESHOLDS = (-1.0, 0.0, 0.5, 1.0, 2.0, 3.0)


def round_numbers(features) -> np.ndarray:
    """1-based round number of each cached round within its dialogue."""
    dialogue = features.dialogue.numpy()
    first = np.r_[True, dialogue[1:] != dialogue[:-1]]
    starts = np.flatnonzero(first)
    return np.arange(len(dialogue)) - np.repeat(starts, np.diff(np.r_[starts, len(dialogue)])) + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="MediRoundCore/weights/mediround-tiny")
    p.add_argument("--features", required=True)
    p.add_argument("--teacher", help="the same dialogues' teacher-forced feature file(s)")
    p.add_argument("--score-below", type=float, default=0.7, help="masks studied in parts 2 and 3")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, _ = MediRound.from_pretrained(args.checkpoint)
    model.eval().requires_grad_(False)
    features = FeatureSet.load(args.features)
    dice, scores, pred_area, target_area, per_threshold = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, len(features), 64):
            b = features.batch(torch.arange(start, min(start + 64, len(features))))
            logits = upsample_logits(model, model.decode_with_prompts(b.embeddings, b.prompts))
            dice.append(hard_dice(logits, b.targets, b.weight))
            per_threshold.append(torch.stack([hard_dice(logits, b.targets, b.weight, t) for t in THRESHOLDS], 1))
            scores.append(model.jcm.quality(b.prompts))
            pred_area.append(((logits > 0).float() * b.weight).flatten(1).sum(-1))
            target_area.append(b.targets.flatten(1).sum(-1))
    dice, scores, pred_area, target_area, per_threshold = (torch.cat(x).numpy() for x in
                                                           (dice, scores, pred_area, target_area, per_threshold))
    loss = 1 - dice
    print(f"{len(dice)} rounds, Dice {100 * dice.mean():.1f}")
    for lo, hi in ((0, 0.05), (0.05, 0.3), (0.3, 0.6), (0.6, 0.8), (0.8, 1.01)):
        sel = (dice >= lo) & (dice < hi)
        if sel.any():
            print(f"Dice [{lo}, {hi}): {sel.sum()} masks, {loss[sel].sum() / loss.sum():.0%} of 1 - Dice, "
                  f"predicted/target area {np.median(pred_area[sel] / np.maximum(target_area[sel], 1)):.2f}, "
                  f"target {np.median(target_area[sel]):.0f} px, score {scores[sel].mean():.2f}")
    low = scores <= args.score_below
    cells = " ".join(f"{t:+.1f}: {100 * per_threshold[low, i].mean():.1f}" for i, t in enumerate(THRESHOLDS))
    print(f"score ≤ {args.score_below} ({low.sum()} masks), Dice by threshold {cells}; best per mask "
          f"{100 * per_threshold[low].max(1).mean():.1f}")
    rows = torch.from_numpy(np.flatnonzero(low))
    b = features.batch(rows)
    prompt = b.prompts.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([prompt], lr=0.1)
    for step in range(1, 21):
        optimizer.zero_grad()
        (-model.jcm.quality(prompt).sum()).backward()
        optimizer.step()
        if step in (1, 5, 10, 20):
            with torch.no_grad():
                logits = upsample_logits(model, model.decode_with_prompts(b.embeddings, prompt))
                print(f"quality ascent step {step}: score {model.jcm.quality(prompt).mean():.2f}, "
                      f"Dice {100 * hard_dice(logits, b.targets, b.weight).mean():.1f}")
    if args.teacher:
        teacher = FeatureSet.load(args.teacher)
        if not torch.equal(teacher.targets_packed, features.targets_packed):
            raise SystemExit("--teacher holds other rounds than --features")
        on_policy, forced, numbers = dice, offline_jcm(model, teacher).dice_raw, round_numbers(features)
        for name, sel in (("all rounds", numbers >= 1), ("rounds >= 4", numbers >= 4)):
            print(f"{name} ({sel.sum()}): Dice on-policy {100 * on_policy[sel].mean():.2f}, ground-truth "
                  f"references and history {100 * forced[sel].mean():.2f}")


if __name__ == "__main__":
    main()
