"""A fast look at a JCM on cached rounds (`train.jcm_features`): no language model, one decoder pass per β.

For held-out cached rounds, decodes every prompt unrefined and corrected, and reports, per β, the mean Dice
of the masks the JCM leaves and corrects (in the segmenter frame, over the unpadded extent), the share
corrected, and the correlation of the quality score with the unrefined mask's Dice. Rounds are scored one by
one (each round's prompt came from the predicted earlier masks), so it misses what a better mask does to the
rounds after it: the multi-round protocol (`select_beta`) decides; this ranks variants in seconds.

    python -m MediRoundCore.evaluate.jcm_offline --checkpoint runs/jcm/x/stage2/checkpoint \
        --features runs/jcm/pred_val.safetensors
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

BETAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class OfflineJCM:
    rounds: int
    dice_raw: np.ndarray  # (N,) Dice of the unrefined masks
    dice_corrected: np.ndarray  # (N,) Dice had every prompt been corrected
    scores: np.ndarray  # (N,) quality scores

    def at(self, beta: float) -> tuple[float, float]:
        """(mean Dice with JCM at β, share corrected)."""
        corrected = self.scores <= beta
        return float(np.where(corrected, self.dice_corrected, self.dice_raw).mean()), float(corrected.mean())

    @property
    def correlation(self) -> float:
        if self.scores.std() == 0 or self.dice_raw.std() == 0:
            return float("nan")
        return float(np.corrcoef(self.scores, self.dice_raw)[0, 1])

    def table(self, betas=BETAS) -> str:
        lines = [f"{self.rounds} rounds; Dice without JCM {100 * self.dice_raw.mean():.2f}; "
                 f"corr(score, Dice) {self.correlation:.2f}", "| β | Dice | Δ | corrected |", "|---|---|---|---|"]
        for beta in betas:
            dice, share = self.at(beta)
            lines.append(f"| {beta:.1f} | {100 * dice:.2f} | {100 * (dice - self.dice_raw.mean()):+.2f} | "
                         f"{100 * share:.1f} % |")
        return "\n".join(lines)


def hard_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, threshold: float = 0.0
              ) -> torch.Tensor:
    """(K,) Dice of each mask binarised at `threshold` over its unpadded extent (1 for empty on empty)."""
    pred = (logits > threshold).float() * weight
    inter = (pred * target).flatten(1).sum(-1)
    total = pred.flatten(1).sum(-1) + target.flatten(1).sum(-1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


@torch.no_grad()
def offline_jcm(model, features, batch_size: int = 64) -> OfflineJCM:
    """Dice of every cached round unrefined and corrected, and its quality score."""
    from ..model.modeling import upsample_logits

    raw, corrected, scores = [], [], []
    for start in range(0, len(features), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(features)))
        batch = features.batch(rows, shared_images=True).to(model.device)  # rows of a dialogue are adjacent
        low_res, mask_tokens = model.decode_with_tokens(batch.embeddings, batch.prompts, batch.rows)
        context = (model.context_from_decode(batch.embeddings[batch.rows], low_res, mask_tokens)
                   if model.jcm.uses_context else None)
        fixed = upsample_logits(model, model.decode_with_prompts(batch.embeddings,
                                                                 model.jcm.correction(batch.prompts, context),
                                                                 batch.rows))
        if model.jcm.refiner is not None:
            if batch.images is None:
                raise ValueError("this JCM has a refiner: the features need images (jcm_features --add-images)")
            fixed = model.jcm.refiner(batch.images, fixed)
        raw.append(hard_dice(upsample_logits(model, low_res), batch.targets, batch.weight))
        corrected.append(hard_dice(fixed, batch.targets, batch.weight))
        scores.append(model.jcm.quality(batch.prompts))
    cat = lambda parts: torch.cat(parts).float().cpu().numpy()  # noqa: E731
    return OfflineJCM(len(features), cat(raw), cat(corrected), cat(scores))


def report(results: dict[str, OfflineJCM], features_desc: str, command: str, betas=(0.6, 0.8, 1.0)) -> str:
    """Markdown: one row per checkpoint, the JCM's change of Dice at a few β and its judgment."""
    head = " | ".join(f"Δ Dice β {b:.1f} (corrected)" for b in betas)
    lines = ["# JCM on cached rounds (offline)", "",
             f"Written by `{command}`; do not edit by hand. {features_desc}. Each round's prompt came from the "
             "predicted earlier masks; rounds are scored one by one (no effect on later rounds). Dice in percent, "
             "in the segmenter frame.", "",
             f"| checkpoint | rounds | Dice, JCM off | corr(score, Dice) | {head} |",
             "|---" * (4 + len(betas)) + "|"]
    for name, r in results.items():
        cells = []
        for b in betas:
            dice, share = r.at(b)
            cells.append(f"{100 * (dice - r.dice_raw.mean()):+.2f} ({100 * share:.0f} %)")
        lines.append(f"| {name} | {r.rounds} | {100 * r.dice_raw.mean():.2f} | {r.correlation:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from pathlib import Path

    from ..model.modeling import MediRound
    from ..train.jcm_features import FeatureSet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+", help="one or more checkpoint folders")
    p.add_argument("--features", required=True, help="feature file(s), joined by commas")
    p.add_argument("--out", help="also write a Markdown comparison of the checkpoints here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    features = FeatureSet.load(args.features)
    results = {}
    for folder in args.checkpoint:
        model, _ = MediRound.from_pretrained(folder)
        if not model.jcm_usable:
            p.error(f"{folder}: its JCM is untrained (config.jcm.trained false: a stage-1 checkpoint); "
                    "compare stage-2 checkpoints")
        results[folder] = offline_jcm(model.eval(), features)
        print(f"## {folder}\n{results[folder].table()}\n", flush=True)
    if args.out:
        meta = features.meta
        desc = (f"{len(features)} rounds of {features.num_dialogues} dialogues ({meta.get('source', '?')} rounds, "
                f"split {meta.get('split', '?')})")
        command = "python -m MediRoundCore.evaluate.jcm_offline " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report(results, desc, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
