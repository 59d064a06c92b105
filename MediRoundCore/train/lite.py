"""Train MediRound-Lite stage 1 on these machines: base parts frozen, each slice view encoded once.

    python -m MediRoundCore.train.lite --out runs/lite --steps 20000 [--encode-only] [--pool-slices 2000]
        [--vision-from MediRoundCore/weights/mediround-tiny]

The model starts from the pinned base weights (`model/lite.py: build_lite`) or resumes `<out>/checkpoint`
(the trainer's optimiser state beside it); segmenter embeddings are cached in `<out>/embeddings` (2 MB per
slice view), so after the first pass over the pool a step costs only the language model, the vision tower and
the mask decoder. `--encode-only` fills the cache (e.g. ahead of training, or on a GPU machine) and stops.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .embedding_cache import EmbeddingCache
from .lite_data import PoolConfig, pool_view
from .trainer import PRECISIONS, STATE_FILE, TrainConfig, Trainer, choose_precision


def encode_pool(model, pool: PoolConfig, cache: EmbeddingCache, batch: int = 4, limit: int | None = None,
                progress: bool = True, ledger: Path | None = None) -> int:
    """Encode every pool view not yet in the cache, listing each in `ledger` (if given) once it is stored;
    returns how many were encoded."""
    from tqdm import tqdm

    from ..model.field_placement import into_field
    from ..model.processing import segmenter_pixels
    from .batching import shown_extent

    entries = range(pool.slices * pool.views if limit is None else min(limit, pool.slices * pool.views))
    before = cache.misses
    pending = []
    for entry in tqdm(entries, disable=not progress, desc="encoding", unit="view"):
        index, view = divmod(entry, pool.views)
        _, image, extent, shift = pool_view(pool.split, pool.seed, index, view)
        # placed as the batcher places it (batching.sample_in_field)
        placed, shown, _ = into_field(image.astype("float32") / 255.0, shown_extent(extent, model.config), shift)
        pending.append(segmenter_pixels(placed, model.config, shown)[0])
        if len(pending) == batch:
            model.encode_segmenter_image(torch.stack(pending))
            pending = []
    if pending:
        model.encode_segmenter_image(torch.stack(pending))
    if ledger is not None:
        from .lite_data import read_ledger, record_entries, repair_ledger

        listed = set(read_ledger(ledger))
        repair_ledger(ledger)
        record_entries(ledger, [e for e in entries if e not in listed])
    return cache.misses - before


def take_vision_tower(model, checkpoint: str | Path) -> int:
    """Start the vision tower from a trained checkpoint of the same vision config (e.g. MediRound-Tiny's,
    which learned to find generated anatomy); returns how many tensors were taken."""
    from ..checkpoints.safety import load_tensors
    from ..errors import CheckpointError

    path = Path(checkpoint)
    path = path / "model.safetensors" if path.is_dir() else path
    tensors = {k: v for k, v in load_tensors(path).items() if k.startswith("vision_tower.")}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("vision_tower.")}
    if set(tensors) != set(own) or any(tuple(tensors[k].shape) != tuple(v.shape) for k, v in own.items()):
        raise CheckpointError(f"{path}: its vision tower does not fit this model's ({len(tensors)} tensors "
                              f"there, {len(own)} here)")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(tensors[key].to(value.dtype))
    return len(own)


def make_trainer(model, tokenizer, out: Path, pool: PoolConfig, config: TrainConfig, new_views: int = 0,
                 workers: int = 0) -> Trainer:
    """A stage-1 trainer on the pool; `new_views` bounds the views each (re)start renders and encodes afresh
    (`lite_data.pool_stream`; the ledger of drawn entries lives in the embeddings' folder, and goes with them).
    `workers` > 0 makes the dialogues and batches in that many processes, beside the steps (the views are encoded
    by the trainer's process, through the cache)."""
    from .lite_data import pool_stream

    model.embedding_cache = cache = EmbeddingCache(out / "embeddings", model)
    stream = pool_stream(pool, new_views, pool_ledger(cache))
    trainer = Trainer(model, tokenizer, config, stream)
    trainer.workers = workers
    return trainer


def pool_ledger(cache: EmbeddingCache) -> Path:
    """The ledger of pool entries drawn for this encoder (`lite_data.pool_stream`), inside its cache folder."""
    return cache.folder / "pool_entries.txt"


def _round_tags(choice: str | None, continued_from: Path | None, preset: bool) -> bool:
    """Round tags of this run: as asked, else as the run it continues (its config.json; untagged when the field
    is absent: written before tags), else the preset's. A prompt layout never changes silently on a resume."""
    if choice is not None:
        return choice == "on"
    if continued_from is not None and (continued_from / "config.json").is_file():
        import json

        return bool(json.loads((continued_from / "config.json").read_text()).get("round_tags", False))
    return preset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MediRoundCore.train.lite", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--dice-weight", type=float, default=0.5)
    parser.add_argument("--bce-weight", type=float, default=2.0)
    parser.add_argument("--reference-noise", type=float, default=0.3)
    parser.add_argument("--pool-slices", type=int, default=2000)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--paraphrase", type=float, default=0.7)
    parser.add_argument("--long-share", type=float, default=0.5,
                        help="share of dialogues with train-long's (the hard split's) settings")
    parser.add_argument("--repeat", type=float, default=PoolConfig.repeat,
                        help="chance of a round asking again for an earlier structure after each round "
                             "(data/repeats.py; mostly worded 'Segment it.': only the reference tells which)")
    parser.add_argument("--empty-containers", type=float, default=PoolConfig.empty_containers,
                        help="chance before a lesion round of the same query on an organ with no lesion on the slice, "
                             "answered absent (data/empty_containers.py; >0 also answers the product resolver's "
                             "guesses of such an organ so)")
    parser.add_argument("--round-tags", choices=("on", "off"), default=None,
                        help="round numbers in the prompt text (MediRoundConfig.round_tags); default: as the "
                             "checkpoint or snapshot continued from, else the lite preset's (on)")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--new-views", type=int, default=0,
                        help="views a (re)start may render and encode afresh, besides those already encoded here "
                             "(0: the whole pool)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0,
                        help="processes making the dialogues and batches beside the steps (0: the trainer's own; "
                             "each worker draws its own --new-views, and more than one may append the same entry "
                             "to the pool ledger twice)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="bf16: bfloat16 autocast, float32 weights (auto: where the CPU or GPU multiplies "
                             "bfloat16 natively; steps 1.3x faster on an AVX512-BF16 CPU)")
    parser.add_argument("--encode-only", action="store_true")
    parser.add_argument("--vision-from", default=None,
                        help="a checkpoint whose vision tower starts this run's (ignored when resuming)")
    parser.add_argument("--from-snapshot", default=None,
                        help="a `train.snapshot` folder to continue from when --out holds no checkpoint (e.g. on "
                             "a fresh clone) or an older one than it (the run went on on another machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..model.lite import build_lite

    out = Path(args.out)
    model, tokenizer = build_lite()
    from .snapshot import snapshot_step

    resuming = (out / "checkpoint" / STATE_FILE).is_file()
    ahead = snapshot_step(args.from_snapshot) if args.from_snapshot is not None else -1
    carried = ahead >= 0
    if args.from_snapshot is not None and not carried:
        print(f"no training snapshot in {args.from_snapshot}: not continuing from one")
    from .trainer import load_trainer_state

    resumed_step = load_trainer_state(out / "checkpoint" / STATE_FILE)["step"] if resuming else -1
    continued = (Path(args.from_snapshot) if carried and ahead > resumed_step else
                 out / "checkpoint" if resuming else None)  # the run this one goes on from, if any
    model.config.round_tags = _round_tags(args.round_tags, continued, model.config.round_tags)
    print(f"round tags: {'on' if model.config.round_tags else 'off'}")
    if args.vision_from and not resuming and not carried:  # a run starting afresh
        print(f"vision tower: {take_vision_tower(model, args.vision_from)} tensors from {args.vision_from}")
    pool = PoolConfig(slices=args.pool_slices, views=args.views, paraphrase=args.paraphrase,
                      long_share=args.long_share, repeat=args.repeat,
                      empty_containers=args.empty_containers)
    config = TrainConfig(output_dir=str(out), stage=1, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         save_every=args.save_every, reference_noise=args.reference_noise,
                         loss_weights={"ce": 1.0, "bce": args.bce_weight, "dice": args.dice_weight},
                         precision=choose_precision(args.precision))
    print(f"precision: {config.precision}")
    if args.encode_only:
        model.eval()
        model.embedding_cache = EmbeddingCache(out / "embeddings", model)
        print(f"encoded {encode_pool(model, pool, model.embedding_cache, ledger=pool_ledger(model.embedding_cache))} "
              f"new views")
        return 0
    trainer = make_trainer(model, tokenizer, out, pool, config, args.new_views, args.workers)
    if carried:
        from .snapshot import load_snapshot

        if ahead > trainer.step:  # none here yet, or this machine's run is behind the one carried
            if resuming:
                print(f"{args.from_snapshot} is at step {ahead}, ahead of {out / 'checkpoint'} (step "
                      f"{trainer.step}): continuing from the snapshot")
            weights, step = load_snapshot(args.from_snapshot)
            trainer.start_from(weights, step, args.from_snapshot)
    trainer.train()
    cache = model.embedding_cache
    print(f"done at step {trainer.step}; embedding cache hits {cache.hits}, misses {cache.misses}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
