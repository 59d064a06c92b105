"""Train the lesion finder (lesion_finder.py) on the training pool's cached segmenter embeddings.

Each pool view (train/lite_data.py) is placed and encoded as lite training places and encodes it, so its
embedding is read back from the run's cache (about 2 ms) rather than encoded (about 1 s); its label map comes from
the generator. A cell's label is the lesion kind covering at least half of it, or none where lesions cover less
than a tenth (cells between are left out). Kept per view: every lesion cell, every cell of an organ that can
host a lesion (the negatives that matter: "which lung holds the nodule"), and as many other cells at random.
A tenth of the views is held out; the report gives how well presence ranks the held-out organs, as the engine
reads it.

    python -m MediRoundCore.train.lesion_finder --model MediRoundCore/weights/mediround-lite \
        --cache runs/lite-ft/embeddings --entries runs/lite-ft/embeddings/<encoder>/pool_entries.txt
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..lesion_finder import LesionFinder, LesionFinderConfig

HOLD_OUT_EVERY = 10  # every tenth view is held out for the report


@dataclass
class ViewCells:
    """One view's kept cells: features (n, C) fp16, labels (n,) (0 none, 1+k kind k), and its host organs'
    presence labels for the report: (frame mask (S,S) bool, kind index or -1 for none) each."""

    features: torch.Tensor
    labels: torch.Tensor
    organs: list
    embedding: torch.Tensor


def view_cells(model, sl, image_u8, extent, shift, kinds, rng, keep_embedding=False) -> ViewCells | None:
    """The kept cells of one pool view (see the module docstring); None for a view with no host organ."""
    from ..data.empty_containers import HOST_NOUNS
    from ..model.field_placement import into_field
    from ..model.processing import masks_to_segmenter_frame, segmenter_pixels
    from .batching import shown_extent

    config = model.config
    size = config.segmenter.image_size
    placed, shown, padding = into_field(image_u8.astype("float32") / 255.0, shown_extent(extent, config), shift)
    pixels, hw = segmenter_pixels(placed, config, shown)
    embedding = model.encode_segmenter_image(pixels[None].to(model.dtype))[0].float()  # (C, g, g)
    grid = embedding.shape[-2:]
    hosts = [i for i in sl.instances if i.kind == "organ" and i.noun in HOST_NOUNS and i.mask.any()]
    if not hosts:
        return None
    lesions = [i for i in sl.instances if i.kind == "lesion" and i.mask.any()]
    frames = masks_to_segmenter_frame(padding.pad(np.stack([i.mask for i in hosts + lesions]).astype(bool)), hw, size)
    cover = F.adaptive_avg_pool2d(frames.float()[:, None], grid)[:, 0]  # (n, g, g)
    host_cover, lesion_cover = cover[:len(hosts)], cover[len(hosts):]
    by_kind = torch.zeros((len(kinds),) + tuple(grid))
    for inst, share in zip(lesions, lesion_cover):
        if inst.noun in kinds:
            by_kind[kinds.index(inst.noun)] += share
    total = by_kind.sum(0)
    best, kind = by_kind.max(0)
    labels = torch.where(best >= 0.5, kind + 1, torch.where(total < 0.1, 0, -1))
    in_host = host_cover.max(0).values >= 0.5
    keep = (labels > 0) | (in_host & (labels == 0))
    others = torch.nonzero((labels == 0) & ~keep).flatten()
    n_other = min(len(others), int(keep.sum()))
    if n_other:
        keep.view(-1)[others[torch.from_numpy(rng.choice(len(others), n_other, replace=False))]] = True
    features = embedding.permute(1, 2, 0)[keep].half()
    organs = []
    for inst, frame in zip(hosts, frames[:len(hosts)]):
        inside = [k for k, lesion in enumerate(lesions) if lesion.parent == inst.name and lesion.noun in kinds]
        organs.append((frame, kinds.index(lesions[inside[0]].noun) if inside else -1))
    return ViewCells(features, labels[keep], organs, embedding.half() if keep_embedding else None)


def collect(model, pool, entries, rng, progress=True) -> tuple[list[ViewCells], list[ViewCells]]:
    """(training views, held-out views) of the pool `entries`."""
    from tqdm import tqdm

    from .lite_data import pool_view

    kinds = list(LesionFinderConfig().kinds)
    train, held = [], []
    with torch.inference_mode():
        for n, entry in enumerate(tqdm(entries, disable=not progress, desc="views", unit="view")):
            index, view = divmod(int(entry), pool.views)
            sl, image, extent, shift = pool_view(pool.split, pool.seed, index, view)
            is_held = n % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
            cells = view_cells(model, sl, image, extent, shift, kinds, rng, keep_embedding=is_held)
            if cells is not None:
                (held if is_held else train).append(cells)
    return train, held


def fit(views: list[ViewCells], config: LesionFinderConfig, steps: int = 3000, batch: int = 4096,
        lr: float = 3e-3, weight_decay: float = 1e-4, balance: float = 0.5, seed: int = 0) -> LesionFinder:
    """AdamW on minibatches of cells; each lesion kind weighted by (cells without a lesion / its cells) to the
    power `balance` (1: as much weight as the cells without a lesion; 0: unweighted)."""
    torch.manual_seed(seed)
    X = torch.cat([v.features for v in views]).float()
    y = torch.cat([v.labels for v in views]).long()
    counts = torch.bincount(y, minlength=1 + len(config.kinds)).float()
    weight = torch.where(counts > 0, (counts[0] / counts.clamp(min=1)) ** balance, torch.zeros_like(counts))
    weight = weight.clamp(max=50.0)
    weight[0] = 1.0
    finder = LesionFinder(config)
    mean, std = X.mean(0), X.std(0) + 1e-4
    opt = torch.optim.AdamW(finder.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=g)
        logits = finder.head((X[idx] - mean)[:, :, None, None] / std[:, None, None])[:, :, 0, 0]
        loss = F.cross_entropy(logits, y[idx], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    _fold_standardisation(finder, mean, std)
    return finder.eval()


def _fold_standardisation(finder: LesionFinder, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make the first layer read raw embeddings: W(x-μ)/σ + b = (W/σ)x + (b - W μ/σ)."""
    first = finder.head[0] if isinstance(finder.head, torch.nn.Sequential) else finder.head
    with torch.no_grad():
        w = first.weight[:, :, 0, 0] / std
        first.bias -= (w * mean).sum(1)
        first.weight.copy_(w[:, :, None, None])


def report(finder: LesionFinder, views: list[ViewCells]) -> dict:
    """Held-out cells' accuracy, and how well presence ranks the host organs: the chance that an organ holding a
    lesion of a kind scores above one without (AUC), for cysts and for the solid kinds, as the engine asks."""
    from ..lesion_finder import SOLID_KINDS

    kinds = finder.config.kinds
    cells_right = cells = 0
    scored = {"cyst": ([], []), "solid": ([], [])}
    with torch.no_grad():
        for v in views:
            logits = finder(v.features.float()[:, :, None, None])[:, :, 0, 0]
            cells_right += int((logits.argmax(1) == v.labels).sum())
            cells += len(v.labels)
            for frame, kind in v.organs:
                for name, group in (("cyst", ("cyst",)), ("solid", SOLID_KINDS)):
                    p = finder.presence(v.embedding.float()[None], frame[None], group)[0]
                    scored[name][0 if kind >= 0 and kinds[kind] in group else 1].append(p)
    out = {"views": len(views), "cells": cells, "cell_accuracy": round(cells_right / max(cells, 1), 4),
           "organs": sum(len(v.organs) for v in views)}
    for name, (pos, neg) in scored.items():
        out[f"organ_auc_{name}"] = round(_auc(pos, neg), 3) if pos and neg else None
    return out


def _auc(positives, negatives) -> float:
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def main(argv=None) -> int:
    from ..errors import MediRoundError
    from ..model.modeling import MediRound
    from .embedding_cache import EmbeddingCache
    from .lite_data import PoolConfig, read_ledger

    p = argparse.ArgumentParser(prog="python -m MediRoundCore.train.lesion_finder", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder whose segmenter encodes the views")
    p.add_argument("--cache", required=True, help="embedding cache folder of the lite run (its `embeddings`)")
    p.add_argument("--entries", help="pool entries to use, one per line (default: the cache's ledger)")
    p.add_argument("--limit", type=int, help="use the first N entries only")
    p.add_argument("--views", type=int, default=PoolConfig.views, help="views per slice of the run's pool")
    p.add_argument("--hidden", type=int, default=LesionFinderConfig.hidden)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", help="folder to save the finder in (default: --model)")
    args = p.parse_args(argv)
    try:
        model, _ = MediRound.from_pretrained(args.model, device="cpu", dtype=torch.float32)
        model.eval()
        model.embedding_cache = cache = EmbeddingCache(args.cache, model)
        ledger = Path(args.entries) if args.entries else cache.folder / "pool_entries.txt"
        entries = read_ledger(ledger) if ledger.is_file() else []
        if not entries:
            raise MediRoundError(f"no pool entries listed in {ledger}: encode the pool first "
                                 "(python -m MediRoundCore.train.lite --encode-only)")
        entries = entries[:args.limit] if args.limit else entries
        train, held = collect(model, PoolConfig(views=args.views), entries, np.random.default_rng(0))
        if not train:
            raise MediRoundError(f"none of the {len(entries)} pool views shows an organ that can hold a lesion")
        print(f"{len(train)} training views, {len(held)} held out; cache hits {cache.hits}, encoded {cache.misses}",
              flush=True)
        config = LesionFinderConfig(channels=train[0].features.shape[1], hidden=args.hidden,
                                    encoder=cache.folder.name)  # the cache's folder is the encoder's fingerprint
        finder = fit(train, config, steps=args.steps)
        print(report(finder, held), flush=True)
        finder.save_pretrained(args.out or args.model)
    except MediRoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
