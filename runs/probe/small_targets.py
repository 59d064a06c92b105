"""Where late rounds lose Dice, by target size, and what small masks look like (the design notes quote it).

    .venv/bin/python runs/probe/small_targets.py --features runs/jcm/val_0.safetensors,runs/jcm/val_1.safetensors \
        --figure runs/probe/small_targets.png

1. Per target-size band of the rounds ≥ 4: masks, Dice of the decode, the Dice the ground truth itself gets when
   drawn at the decoder's resolution (a quarter of the input) and upsampled like a decode, the share of the
   late-round loss, and the JCM's judgment.
2. With --figure (features with images): small masks of middling Dice, the slice around them, the target, the
   decode and, when the checkpoint's JCM has a refiner, its redraw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from jcm_headroom import round_numbers  # noqa: E402

from MediRoundCore.evaluate.jcm_offline import hard_dice  # noqa: E402
from MediRoundCore.model.modeling import MediRound, upsample_logits  # noqa: E402
from MediRoundCore.train.jcm_features import FeatureSet  # noqa: E402

BANDS = ((0, 200), (200, 500), (500, 1500), (1500, 5000), (5000, 10 ** 9))


def size_table(model, features, beta: float) -> None:
    numbers = round_numbers(features)
    dice, ceiling, area, scores = [], [], [], []
    factor = model.config.segmenter.image_size // (4 * model.config.segmenter.embedding_size)
    with torch.no_grad():
        for start in range(0, len(features), 64):
            b = features.batch(torch.arange(start, min(start + 64, len(features))))
            dice.append(hard_dice(upsample_logits(model, model.decode_with_prompts(b.embeddings, b.prompts)),
                                  b.targets, b.weight))
            cells = F.avg_pool2d(b.targets[:, None], factor)  # the target at the decoder's resolution
            ceiling.append(hard_dice(upsample_logits(model, torch.logit(cells.clamp(1e-4, 1 - 1e-4))), b.targets,
                                     b.weight))
            area.append(b.targets.flatten(1).sum(-1))
            scores.append(model.jcm.quality(b.prompts))
    dice, ceiling, area, scores = (torch.cat(x).numpy() for x in (dice, ceiling, area, scores))
    late = numbers >= 4
    loss = ((1 - dice) * late).sum()
    print(f"{late.sum()} rounds >= 4: Dice {100 * dice[late].mean():.2f}; the ground truth drawn at the decoder's "
          f"resolution {100 * ceiling[late].mean():.2f}")
    print("| target px | masks | Dice | ground truth at decoder resolution | share of loss | JCM score | "
          f"scored ≤ {beta} |\n|---|---|---|---|---|---|---|")
    for lo, hi in BANDS:
        sel = late & (area >= lo) & (area < hi)
        if sel.any():
            print(f"| {lo}–{hi if hi < 10 ** 9 else '…'} | {sel.sum()} | {100 * dice[sel].mean():.1f} | "
                  f"{100 * ceiling[sel].mean():.1f} | {((1 - dice) * sel).sum() / loss:.0%} | "
                  f"{scores[sel].mean():.2f} | {(scores[sel] <= beta).mean():.0%} |")
    low = late & (scores <= beta)
    print(f"scored ≤ {beta}: {low.sum()} masks ({low.sum() / late.sum():.0%}), Dice {100 * dice[low].mean():.1f}, "
          f"median target {np.median(area[low]):.0f} px")


def figure(model, features, path: Path, count: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if features.images is None:
        raise SystemExit("--figure needs features with images (jcm_features --add-images)")
    b = features.batch(torch.arange(min(len(features), 700)))
    with torch.no_grad():
        logits = upsample_logits(model, model.decode_with_prompts(b.embeddings, b.prompts))
        dice = hard_dice(logits, b.targets, b.weight)
        area = b.targets.flatten(1).sum(-1)
        rows = ((area < 200) & (dice > 0.2) & (dice < 0.7)).nonzero().squeeze(-1)[:count]
        redrawn = model.jcm.refiner(b.images[rows], logits[rows]) if model.jcm.refiner is not None else None
    columns = 3 if redrawn is None else 4
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.5 * columns, 2.5 * len(rows)), squeeze=False)
    for i, k in enumerate(rows.tolist()):
        ys, xs = torch.nonzero(b.targets[k], as_tuple=True)
        cy, cx = int(ys.float().mean()), int(xs.float().mean())
        window = (slice(max(cy - 24, 0), cy + 24), slice(max(cx - 24, 0), cx + 24))
        panels = [(b.images[k], f"slice (target {int(area[k])} px)", "gray"), (b.targets[k], "target", None),
                  (logits[k] > 0, f"decode, Dice {dice[k]:.2f}", None)]
        if redrawn is not None:
            score = hard_dice(redrawn[i:i + 1], b.targets[k:k + 1], b.weight[k:k + 1]).item()
            panels.append((redrawn[i] > 0, f"refiner, Dice {score:.2f}", None))
        for ax, (image, title, cmap) in zip(axes[i], panels):
            ax.imshow(image[window].float(), cmap=cmap)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="MediRoundCore/weights/mediround-tiny")
    p.add_argument("--features", required=True)
    p.add_argument("--beta", type=float, default=0.6)
    p.add_argument("--figure", type=Path, help="also draw small masks of middling Dice here (PNG)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = MediRound.from_pretrained(args.checkpoint)
    model.eval()
    features = FeatureSet.load(args.features)
    size_table(model, features, args.beta)
    if args.figure:
        figure(model, features, args.figure)


if __name__ == "__main__":
    main()
