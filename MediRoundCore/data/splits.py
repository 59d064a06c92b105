"""Generated splits in the MR-MedSeg format, in-memory training samples, long dialogues, statistics.

Fixed split parameters (`SPLITS`):

| split   | rounds | templates          | paired lesions | reach-back pref. | distractor pref. | noise     | contrast  |
|---------|--------|--------------------|----------------|------------------|------------------|-----------|-----------|
| train   | 2-8    | train only         | 0.5            | 0.35             | 0.35             | 0.0-1.0   | 0.5-1.5   |
| val     | 2-10   | all (incl. reserved)| 0.5           | 0.35             | 0.35             | 0.0-1.0   | 0.5-1.5   |
| regular | 2-5    | all                | 0.2            | 0.2              | 0.15             | 0.1-0.4   | 0.85-1.15 |
| hard    | 6-10   | all                | 0.8            | 0.55             | 0.6              | 0.0-1.0   | 0.5-1.5   |
| train-long | 4-10 | train only        | 0.8            | 0.55             | 0.6              | 0.0-1.0   | 0.5-1.5   |

`train-long` is training data only: the hard split's dialogue settings with the train templates and its own
anatomy seeds, so a training mixture (`iter_training_samples(split="train+train-long")`) sees long dialogues,
reach-backs and distractors as often as the hard test does, never its templates or anatomy.

Anatomy seeds are disjoint per split: split base + seed * 1e6 + index * 8 + attempt.
CLI: `python -m MediRoundCore.data.splits hard out/hard 500 --seed 0`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..answers import strip_seg
from ..errors import DatasetError
from .anatomy import MODALITIES, REGIONS, generate_slice
from .dataset import Sample, find_dataset_json
from .dialogues import DialoguePolicy, GeneratedDialogue, generate_dialogue
from .mrmedseg import Conversation, DialogueRound, read_conversations, write_conversations

GENERATOR = "MediRoundCore.data synthetic v1"
MAX_SEED = 1000
MAX_DIALOGUES = 125_000


@dataclass(frozen=True)
class SplitParams:
    """Generator settings of one split (documented in docs/data.md)."""

    name: str
    rounds: tuple[int, int]
    seed_base: int
    use_reserved: bool
    p_paired: float
    p_reach_back: float
    p_distractor: float
    noise: tuple[float, float]
    contrast: tuple[float, float]
    p_first_inferential: float = 0.4
    p_mr: float = 0.35


SPLITS = {
    "train": SplitParams("train", (2, 8), 0, False, 0.5, 0.35, 0.35, (0.0, 1.0), (0.5, 1.5)),
    "val": SplitParams("val", (2, 10), 1_000_000_000, True, 0.5, 0.35, 0.35, (0.0, 1.0), (0.5, 1.5)),
    "regular": SplitParams("regular", (2, 5), 2_000_000_000, True, 0.2, 0.2, 0.15, (0.1, 0.4), (0.85, 1.15)),
    "hard": SplitParams("hard", (6, 10), 3_000_000_000, True, 0.8, 0.55, 0.6, (0.0, 1.0), (0.5, 1.5)),
    "train-long": SplitParams("train-long", (4, 10), 5_000_000_000, False, 0.8, 0.55, 0.6, (0.0, 1.0), (0.5, 1.5)),
}
TRAINING_SPLITS = ("train", "train-long")
LONG_SEED_BASE = 4_000_000_000


def _params(name: str) -> SplitParams:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[name]


def make_dialogue(name: str, seed: int, index: int) -> GeneratedDialogue:
    """Dialogue `index` of split `name` for `seed` (deterministic)."""
    p = _params(name)
    if not 0 <= seed < MAX_SEED or not 0 <= index < MAX_DIALOGUES:
        raise ValueError(f"seed must be in [0, {MAX_SEED}) and index in [0, {MAX_DIALOGUES})")
    policy = DialoguePolicy(p.use_reserved, p.p_reach_back, p.p_distractor, p.p_first_inferential)
    for attempt in range(8):
        anatomy_seed = p.seed_base + seed * 1_000_000 + index * 8 + attempt
        rng = np.random.default_rng([anatomy_seed, 5])
        region = REGIONS[(index + seed) % len(REGIONS)]
        modality = MODALITIES[int(rng.uniform() < p.p_mr)]
        n_rounds = int(rng.integers(p.rounds[0], p.rounds[1] + 1))
        sl = generate_slice(region, anatomy_seed, modality=modality, noise_level=float(rng.uniform(*p.noise)),
                            contrast=float(rng.uniform(*p.contrast)), paired=bool(rng.uniform() < p.p_paired))
        try:
            dlg = generate_dialogue(sl, n_rounds, [anatomy_seed], policy)
        except ValueError:
            continue
        dlg.info = {"generator": GENERATOR, "split": name, "index": index}
        return dlg
    raise RuntimeError(f"split {name}: no dialogue for seed {seed} index {index}")  # pragma: no cover


def display_uint8(dlg: GeneratedDialogue) -> np.ndarray:
    """The slice as the 8-bit image that is written to (and read back from) PNG."""
    return np.round(dlg.slice.display() * 255).astype(np.uint8)


def to_sample(dlg: GeneratedDialogue) -> Sample:
    """In-memory Sample, identical to what the dataset reader returns for the written split."""
    return Sample(
        image=display_uint8(dlg).astype(np.float32) / 255.0,
        queries=[r.query for r in dlg.rounds],
        answers=[r.answer for r in dlg.rounds],
        masks=dlg.masks(),
        ref_indices=[r.ref for r in dlg.rounds],
        entities=[r.entity for r in dlg.rounds],
        meta=dlg.meta(),
    )


def write_dialogue(dlg: GeneratedDialogue, out_dir: Path, stem: str) -> Conversation:
    """Write the image and masks of a dialogue; return its conversation (paths relative to out_dir)."""
    image_path = f"images/{stem}.png"
    Image.fromarray(display_uint8(dlg)).save(out_dir / image_path)
    rounds = []
    for k, (rnd, mask) in enumerate(zip(dlg.rounds, dlg.masks())):
        mask_path = f"masks/{stem}_round_{k:02d}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(out_dir / mask_path)
        ref_path = rounds[rnd.ref].mask_path if rnd.ref is not None else None
        rounds.append(DialogueRound(rnd.query, strip_seg(rnd.answer), mask_path, rnd.ref, ref_path))
    return Conversation(image_path, rounds, "segmentation", "[null]", {"meta": dlg.meta()})


def build_split(name: str, out_dir, n_dialogues: int, seed: int = 0) -> Path:
    """Write split `name` (images/, masks/, `<name>.json`) into out_dir; returns the JSON path."""
    _params(name)
    if n_dialogues < 1:
        raise ValueError("n_dialogues must be at least 1")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    convs = [write_dialogue(make_dialogue(name, seed, i), out, f"{name}_{seed:03d}_{i:06d}") for i in range(n_dialogues)]
    return write_conversations(convs, out / f"{name}.json")


def training_split_names(split: str) -> list[str]:
    """The training splits of a mixture ("train+train-long"), checked."""
    names = split.split("+")
    for name in names:
        if name not in TRAINING_SPLITS:
            from ..errors import OptionError

            raise OptionError(f"{name!r} is not a training split; expected one of {TRAINING_SPLITS} joined by '+'")
    return names


def iter_training_samples(seed: int = 0, n: int | None = None, split: str = "train"):
    """Training samples generated on the fly (no files); endless unless `n` is given.

    `split` is one training split or a mixture joined by "+" ("train+train-long"), taken in turn.
    """
    names = training_split_names(split)
    index = 0
    while n is None or index < n:
        yield to_sample(make_dialogue(names[index % len(names)], seed, index // len(names)))
        index += 1


def iter_varied_samples(seed: int = 0, split: str = "train", paraphrase: float = 0.0, absent: float = 0.0,
                        repeat: float = 0.0):
    """`iter_training_samples` with a share `paraphrase` of the queries re-worded by the paraphrase grammar
    (data/paraphrase.py), absent-target rounds inserted after each round and before the first with probability
    `absent`, as many direct requests for structures on the slice to contrast them (data/absent.py), and rounds
    asking again for an earlier structure with probability `repeat` (data/repeats.py); endless."""
    from .absent import with_absent_rounds
    from .paraphrase import rephrase_dialogue
    from .repeats import with_repeated_rounds

    names = training_split_names(split)
    index = 0
    while True:
        dlg = make_dialogue(names[index % len(names)], seed, index // len(names))
        rng = np.random.default_rng([seed, index, 41])
        sample = to_sample(dlg)
        if paraphrase > 0:
            sample.queries = rephrase_dialogue(dlg, rng, paraphrase)
        if repeat > 0:  # before the absent rounds, so that each inserted round refers to the one before it
            sample = with_repeated_rounds(sample, rng, repeat)
        if absent > 0:
            sample = with_absent_rounds(sample, dlg.slice, rng, absent, present=absent, refer_previous=True,
                                        first=absent)
        yield sample
        index += 1


def long_dialogue(seed: int = 0, n_rounds: int = 20) -> Sample:
    """A dialogue of n_rounds (up to about 22) on one abdomen slice with many lesions, for benchmarks."""
    lesions = {"liver": 2, "spleen": 2, "left kidney": 2, "right kidney": 2, "force_gallbladder": 1}
    policy = DialoguePolicy(use_reserved=True, p_reach_back=0.4, p_distractor=0.3)
    for attempt in range(40):
        anatomy_seed = LONG_SEED_BASE + seed * 1000 + attempt
        sl = generate_slice("abdomen", anatomy_seed, modality="CT", noise_level=0.3, contrast=1.0, lesions=lesions)
        if sum(i.kind != "body" for i in sl.instances) < n_rounds:
            continue
        try:
            dlg = generate_dialogue(sl, n_rounds, [anatomy_seed], policy, attempts=10)
        except ValueError:
            continue
        dlg.info = {"generator": GENERATOR, "split": "long", "index": seed}
        return to_sample(dlg)
    raise ValueError(f"no {n_rounds}-round dialogue found for seed {seed}; at most about 22 rounds fit one slice")


def split_statistics(folder) -> dict:
    """Split parameters measured from the written files (JSON structure and the per-conversation meta)."""
    folder = Path(folder)
    json_path = find_dataset_json(folder)
    convs = read_conversations(json_path, folder, check=False)
    n_rounds = [len(c.rounds) for c in convs]
    reaches = [k - r.ref_index for c in convs for k, r in enumerate(c.rounds) if r.ref_index is not None]
    metas = [c.extra.get("meta") for c in convs]
    if any(not isinstance(m, dict) or "rounds" not in m for m in metas):
        raise DatasetError(f"{json_path}: split statistics need the generator's 'meta' on every conversation")
    with_distractor = sum(any(r["distractors"] > 0 and r["ref"] is not None for r in m["rounds"]) for m in metas)
    lesion_distractor = sum(any(r["distractors"] > 0 and r["relation"] in ("lesion", "hierarchy")
                                for r in m["rounds"]) for m in metas)
    templates: dict[str, set] = {}
    for m in metas:
        for r in m["rounds"]:
            templates.setdefault(r["relation"], set()).add(r["template"])
    from .templates import is_reserved
    return {
        "dialogues": len(convs),
        "rounds_min": min(n_rounds), "rounds_max": max(n_rounds), "rounds_mean": float(np.mean(n_rounds)),
        "rounds_histogram": dict(sorted(Counter(n_rounds).items())),
        "references": len(reaches),
        "reach_back_2plus_share": float(np.mean([x >= 2 for x in reaches])) if reaches else 0.0,
        "distractor_dialogue_share": with_distractor / len(convs),
        "lesion_or_part_distractor_share": lesion_distractor / len(convs),
        "relations": dict(sorted(Counter(r["relation"] for m in metas for r in m["rounds"]).items())),
        "templates_used": {k: sorted(v) for k, v in sorted(templates.items())},
        "reserved_templates_used": sum(is_reserved(r["template"]) for m in metas for r in m["rounds"]),
        "regions": dict(sorted(Counter(m["region"] for m in metas).items())),
        "modalities": dict(sorted(Counter(m["modality"] for m in metas).items())),
        "noise_range": [min(m["noise_level"] for m in metas), max(m["noise_level"] for m in metas)],
        "contrast_range": [min(m["contrast"] for m in metas), max(m["contrast"] for m in metas)],
    }


def main(argv=None) -> None:
    """Command line: build a split and print its measured statistics."""
    ap = argparse.ArgumentParser(description="Write a generated MR-MedSeg split.")
    ap.add_argument("split", choices=sorted(SPLITS))
    ap.add_argument("out_dir")
    ap.add_argument("n_dialogues", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build_split(args.split, args.out_dir, args.n_dialogues, args.seed)
    print(json.dumps(split_statistics(args.out_dir), indent=2))


if __name__ == "__main__":
    main()
