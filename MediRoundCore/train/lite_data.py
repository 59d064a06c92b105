"""Training stream for a model with a frozen, slow image encoder (lite): a fixed pool of slice views, each
encoded once (train/embedding_cache.py), and on each view as many fresh dialogues as training asks for.

A pool entry is (slice index, view): the slice of generated training dialogue `index` (train split, seed 0)
and, for view > 0, one domain-randomised view of it (data/augment.py: window, resolution, blur, noise, field
of view; masks follow). A smaller field of view is cut out at the slice's scale, not magnified, and records its
share of the model's field (`meta["frame_extent"]`), so a model with a physical field of view
(`MediRoundConfig.field_of_view_mm`) sees its anatomy at the size it has in every other view.
Each draw builds a new dialogue on the entry (the generator's relations, train
templates; half of them with the long dialogues, reach-backs and distractors of `train-long`, the hard split's
settings), re-words its queries with the paraphrase grammar (data/paraphrase.py), inserts rounds that ask again
for an earlier structure (data/repeats.py), absent-target rounds with direct requests for present structures
to contrast them (data/absent.py), refers a share of the dialogues where the product's resolver reads them
(data/product_references.py), as MediRound-Tiny's last phases learned to need, and then asks lesion queries
on organs without a lesion, answered absent (data/empty_containers.py). The image of an entry
is identical at every draw (8-bit, as the written splits), so its embedding is read back from the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..data.absent import with_absent_rounds
from ..data.augment import Randomization, randomized_view
from ..data.bare_requests import with_bare_requests
from ..data.dataset import Sample
from ..data.dialogues import DialoguePolicy, generate_dialogue
from ..data.empty_containers import with_empty_container_rounds
from ..data.field_of_view import crop_extent, crop_shift
from ..data.paraphrase import rephrase_dialogue
from ..data.product_references import shipped_scorer, with_product_references
from ..data.repeats import with_repeated_rounds
from ..data.splits import SPLITS, make_dialogue


@dataclass(frozen=True)
class PoolConfig:
    slices: int = 2000  # distinct generated slices
    views: int = 2  # views per slice: the plain one and views-1 randomised ones
    paraphrase: float = 0.7  # share of rounds re-worded by the grammar (the rest keep their train template)
    absent: float = 0.12  # chance of an absent-target round after each round and before the first, and of a
    # direct request for a structure on the slice to contrast them (data/absent.py)
    repeat: float = 0.2  # chance of a round asking again for an earlier structure after each round (data/repeats.py)
    bare: float = 0.15  # chance of a request naming no structure ("Segment the lesion.") before the first round,
    # half that after each round, one at most (data/bare_requests.py)
    product_references: float = 0.3  # share of dialogues referring where the product's resolver reads them
    # (data/product_references.py; targets unchanged)
    empty_containers: float = 0.0  # chance, before a lesion round, of the same query on an organ without a lesion,
    # answered absent; and the product's guesses of such an organ answered so (data/empty_containers.py)
    long_share: float = 0.5  # share of dialogues drawn with `long_split`'s settings (rounds, reach-backs,
    # distractors: the hard split's, data/splits.py), the rest with `split`'s
    long_split: str = "train-long"
    split: str = "train"
    seed: int = 0

    def __post_init__(self):
        from ..data.splits import TRAINING_SPLITS

        for name in (self.split, self.long_split):
            if name not in TRAINING_SPLITS:  # the evaluation splits' reserved settings stay out of training
                raise ValueError(f"pool split {name!r} is not a training split; expected one of {TRAINING_SPLITS}")
        if not 0.0 <= self.long_share <= 1.0:
            raise ValueError(f"long_share must be from 0 to 1, got {self.long_share}")


POOL_VIEWS_KEPT = 4096  # about 1 MiB each: a whole pool of 2000 views stays in memory (4 GiB at most)


@lru_cache(maxsize=POOL_VIEWS_KEPT)  # rendering a view takes about 1 s, reading it back nothing: keep the pool
def pool_view(split: str, seed: int, index: int, view: int):
    """(AnatomySlice with the view's instance masks, display image uint8, share of the whole slice's frame
    (rows, cols), place of its centre in the field (`SliceImage.frame_shift`); both None for the whole slice) of
    one pool entry."""
    sl = make_dialogue(split, seed, index).slice
    if view == 0:
        return sl, np.round(sl.display() * 255).astype(np.uint8), None, None
    rng = np.random.default_rng([seed, index, view, 17])
    masks = np.stack([i.mask for i in sl.instances])
    image, masks, box = randomized_view(rng, sl.image, masks, sl.modality, sl.region, Randomization(keep_scale=True))
    # a field-of-view crop at the slice's scale records its share of the frame and its place in it
    extent = None if box is None else crop_extent(sl.image.shape[:2], image.shape[:2])
    shift = None if box is None else crop_shift(sl.image.shape[:2], box)
    instances = [dataclasses.replace(inst, mask=m, area=int(m.sum())) for inst, m in zip(sl.instances, masks)]
    return dataclasses.replace(sl, instances=instances), np.round(image * 255).astype(np.uint8), extent, shift


@lru_cache(maxsize=1)
def _scorer():
    return shipped_scorer()  # read once per process: it does not change during a run


def pool_sample(cfg: PoolConfig, entry: int, draw: int) -> Sample | None:
    """Dialogue `draw` on pool entry `entry` (None when that view supports no dialogue of the drawn length)."""
    index, view = divmod(entry, cfg.views)
    sl, image, extent, shift = pool_view(cfg.split, cfg.seed, index, view)
    rng = np.random.default_rng([cfg.seed, entry, draw, 29])
    p = SPLITS[cfg.long_split if rng.random() < cfg.long_share else cfg.split]
    policy = DialoguePolicy(p.use_reserved, p.p_reach_back, p.p_distractor, p.p_first_inferential)
    n_rounds = int(rng.integers(p.rounds[0], p.rounds[1] + 1))
    try:
        dlg = generate_dialogue(sl, n_rounds, [cfg.seed, entry, draw], policy)
    except ValueError:
        return None
    queries = rephrase_dialogue(dlg, rng, cfg.paraphrase)
    sample = Sample(image=image.astype(np.float32) / 255.0, queries=queries, answers=[r.answer for r in dlg.rounds],
                    masks=np.stack([sl.instance(r.target).mask for r in dlg.rounds]),
                    ref_indices=[r.ref for r in dlg.rounds], entities=[r.entity for r in dlg.rounds],
                    meta={"pool_entry": entry, "draw": draw, "region": sl.region, "modality": sl.modality,
                          "dialogue_settings": p.name,
                          **({} if extent is None else {"frame_extent": extent, "frame_shift": shift})})
    if cfg.repeat > 0:  # before the absent rounds, so that each inserted round refers to the one before it
        sample = with_repeated_rounds(sample, rng, cfg.repeat)
    if cfg.absent > 0:
        sample = with_absent_rounds(sample, sl, rng, cfg.absent, present=cfg.absent, refer_previous=True,
                                    first=cfg.absent)
    if cfg.bare > 0:
        sample = with_bare_requests(sample, sl, rng, cfg.bare)
    if cfg.product_references > 0:
        sample = with_product_references(sample, rng, cfg.product_references, _scorer())
    if cfg.empty_containers > 0:  # after the product's references: its wrong guesses are among those answered
        sample = with_empty_container_rounds(sample, sl, rng, cfg.empty_containers)
    return sample


def pool_stream(cfg: PoolConfig, new_views: int = 0, ledger: str | Path | None = None):
    """A resumable stream factory for `Trainer`: seed → endless samples over random pool entries.

    `new_views` > 0 bounds what a (re)started run renders and encodes afresh (about 2 s per view on two CPU
    cores): each stream draws from the entries the `ledger` file lists and `new_views` other random ones,
    instead of from the whole pool. The ledger lists the entries streams drew before (an entry is encoded in
    the step that draws it; one drawn just before a crash may not be yet, and costs one encoding later), so it
    belongs with the cache (`train.lite.pool_ledger`). A fresh clone then starts in minutes, not in an hour, and
    the pool is covered over restarts."""
    ledger = Path(ledger) if ledger is not None else None

    def stream(seed: int):
        rng = np.random.default_rng([cfg.seed, seed, 31])
        known = read_ledger(ledger)
        repair_ledger(ledger)
        entries = stream_entries(cfg.slices * cfg.views, new_views, known, rng)
        recorded = set(known)
        draw = 0
        while True:
            entry = int(rng.integers(cfg.slices * cfg.views)) if entries is None else int(rng.choice(entries))
            draw += 1
            if ledger is not None and entry not in recorded:
                recorded.add(entry)
                record_entries(ledger, [entry])
            sample = pool_sample(cfg, entry, seed * 1_000_003 + draw)
            if sample is not None:
                yield sample
    return stream


def read_ledger(path: Path | None) -> list[int]:
    """Pool entries a ledger lists, one per line; a last line without its newline (cut by a crash: "456"
    may read "45") and unreadable lines are skipped."""
    if path is None or not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]  # the part after the last newline is not a whole line
    entries = []
    for line in lines:
        try:
            entries.append(int(line))
        except ValueError:
            continue
    return entries


def repair_ledger(path: Path | None) -> None:
    """Drop a last line cut by a crash (`read_ledger` never read it), so that appended entries start a line."""
    if path is not None and path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[:data.rfind(b"\n") + 1])


def record_entries(path: Path, entries: list[int]) -> None:
    """Append entries to a ledger (repaired, `repair_ledger`, before the first append of a process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write("".join(f"{e}\n" for e in entries))


def stream_entries(total: int, new_views: int, known: list[int], rng) -> np.ndarray | None:
    """The entries a stream draws from: None for the whole pool (no bound, or the bound covers it), else the
    known ones in range and `new_views` others drawn without replacement."""
    known = sorted({e for e in known if 0 <= e < total})
    if new_views <= 0 or len(known) + new_views >= total:
        return None
    others = np.setdiff1d(np.arange(total), known)
    return np.concatenate([np.array(known, dtype=np.int64), rng.choice(others, new_views, replace=False)])
