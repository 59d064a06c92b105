"""Cached stage-2 features: the frozen model runs once per round, so the JCM can train for many steps cheaply.

Stage 2 trains only the two JCM MLPs; everything they see is the frozen model's output. Running the language
model and the image encoder once per round and keeping the results turns a stage-2 step into a mask-decoder
pass. Two sources of rounds:

- `predicted` (on-policy): the multi-round protocol on training dialogues, JCM off, dataset references, each
  round's *predicted* mask feeding the rounds that refer to it: the prompts the JCM meets at inference.
- `teacher`: teacher-forced batches (reference masks from the ground truth, a share perturbed like
  predictions), the inputs of the streaming stage 2 (`trainer.stage2_losses`).

A `FeatureSet` keeps, per round, the 256-d [SEG] prompt before JCM and the ground-truth mask in the segmenter
frame; per dialogue, the segmenter image embedding, the unpadded extent and the segmenter input image itself
(what a refining correction, `jcm.MaskRefiner`, looks at). One safetensors file, no pickles. Files collected
before images were kept get them with `--add-images FILE` (the dialogues are regenerated from the file's split,
seed and range; no model runs).

    python -m MediRoundCore.train.jcm_features --checkpoint MediRoundCore/weights/mediround-tiny \
        --split train-long --start 0 --dialogues 800 --out runs/jcm/features_0.safetensors

Shards (`--start`, `--dialogues`) run in parallel, one process per core (dialogue generation is CPU work), and
are joined by `FeatureSet.load("a.safetensors,b.safetensors")`; on a GPU the model runs in bf16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.jcm import refiner_image
from ..model.modeling import valid_region_mask
from ..model.processing import masks_to_segmenter_frame

SOURCES = ("predicted", "teacher")


@dataclass
class FeatureBatch:
    """One cached stage-2 step: prompt k decodes on image embedding row k against target mask k."""

    embeddings: torch.Tensor  # (K,C,g,g), or (B,C,g,g) the batch's distinct images when `rows` is set
    prompts: torch.Tensor  # (K,256) before JCM
    targets: torch.Tensor  # (K,S,S) in the segmenter frame
    weight: torch.Tensor  # (K,S,S) 1 inside each image's unpadded extent
    images: torch.Tensor | None = None  # (K,S,S) segmenter input (channel mean), if the set keeps images
    rows: torch.Tensor | None = None  # (K,) the embedding row of each round (shared images)

    def to(self, device):
        for name, value in vars(self).items():
            if value is not None:
                setattr(self, name, value.to(device))
        return self


class FeatureSet:
    """Rounds (prompt, target) over dialogues (image embedding, unpadded extent)."""

    def __init__(self, prompts, dialogue, targets_packed, embeddings, valid_hw, size: int, meta: dict | None = None,
                 images=None):
        self.prompts = prompts.float()
        self.dialogue = dialogue.long()
        self.targets_packed = targets_packed  # (N, S*S/8) uint8, np.packbits of the (S,S) target
        self.embeddings = embeddings  # (D,C,g,g) float16
        self.valid_hw = valid_hw.long()
        self.size = int(size)
        self.meta = dict(meta or {})
        self.images = images  # (D,S,S) float16 segmenter input of each dialogue, or None
        if images is not None and tuple(images.shape) != (len(embeddings), self.size, self.size):
            raise ValueError(f"images of shape {tuple(images.shape)} do not fit {len(embeddings)} dialogues of a "
                             f"{self.size}² segmenter")
        if not (len(self.prompts) == len(self.dialogue) == len(self.targets_packed)):
            raise ValueError("prompts, dialogue indices and targets differ in length")
        if len(self.dialogue) and int(self.dialogue.max()) >= len(self.embeddings):
            raise ValueError("a round refers to a dialogue with no image embedding")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_dialogues(self) -> int:
        return len(self.embeddings)

    # -- rows ----------------------------------------------------------------------------------------
    @staticmethod
    def pack(targets: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.packbits(targets.bool().flatten(1).numpy(), axis=1))

    def targets(self, rows: torch.Tensor) -> torch.Tensor:
        bits = np.unpackbits(self.targets_packed[rows].numpy(), axis=1, count=self.size * self.size)
        return torch.from_numpy(bits).float().reshape(-1, self.size, self.size)

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        extents = [tuple(hw) for hw in self.valid_hw[self.dialogue[rows]].tolist()]
        return valid_region_mask(extents, [1] * len(extents), self.size, "cpu")

    def batch(self, rows: torch.Tensor, shared_images: bool = False) -> FeatureBatch:
        """The rounds `rows`; with `shared_images` each distinct image embedding once and `rows` pointing into
        them, so the mask decoder prepares each image once (`MediRound.decode_with_tokens(..., rows)`: on
        LiteMedSAM's 64² grid a batch of 32 rounds of 32 images took 9.5 s a training step on two cores)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        images = None if self.images is None else self.images[self.dialogue[rows]].float()
        if shared_images:
            dialogues, index = torch.unique(self.dialogue[rows], return_inverse=True)
            return FeatureBatch(self.embeddings[dialogues].float(), self.prompts[rows], self.targets(rows),
                                self.weights(rows), images, index)
        return FeatureBatch(self.embeddings[self.dialogue[rows]].float(), self.prompts[rows], self.targets(rows),
                            self.weights(rows), images)

    def batches(self, batch_size: int, seed: int = 0, by_dialogue: bool = False):
        """Endless shuffled batches (a new permutation every epoch), seeded for resumable runs. `by_dialogue`:
        each batch holds whole dialogues, shuffled, added until it has at least `batch_size` rounds, with shared
        images (`batch`); each dialogue at most once an epoch (those left over at its end wait for the next)."""
        if len(self) < batch_size:
            raise ValueError(f"{len(self)} cached rounds cannot fill a batch of {batch_size}")
        generator = torch.Generator().manual_seed(seed)
        if by_dialogue:
            yield from self._dialogue_batches(batch_size, generator)
        while True:
            order = torch.randperm(len(self), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield self.batch(order[start:start + batch_size])

    def _dialogue_batches(self, batch_size: int, generator):
        """`batches(by_dialogue=True)`: endless batches of whole shuffled dialogues, images shared."""
        order = torch.argsort(self.dialogue, stable=True)
        counts = torch.bincount(self.dialogue, minlength=self.num_dialogues)
        starts = torch.cumsum(counts, 0) - counts
        while True:
            pending = []
            for d in torch.randperm(self.num_dialogues, generator=generator).tolist():
                pending.append(order[starts[d]:starts[d] + counts[d]])
                if sum(len(p) for p in pending) >= batch_size:
                    yield self.batch(torch.cat(pending), shared_images=True)
                    pending = []

    def split(self, val_dialogues: int) -> tuple["FeatureSet", "FeatureSet"]:
        """(train, held out): the last `val_dialogues` dialogues held out whole."""
        cut = self.num_dialogues - val_dialogues
        if not 0 < cut < self.num_dialogues:
            raise ValueError(f"cannot hold out {val_dialogues} of {self.num_dialogues} dialogues")
        head, tail = self.dialogue < cut, self.dialogue >= cut
        images = (None, None) if self.images is None else (self.images[:cut], self.images[cut:])
        return (FeatureSet(self.prompts[head], self.dialogue[head], self.targets_packed[head], self.embeddings[:cut],
                           self.valid_hw[:cut], self.size, self.meta, images[0]),
                FeatureSet(self.prompts[tail], self.dialogue[tail] - cut, self.targets_packed[tail],
                           self.embeddings[cut:], self.valid_hw[cut:], self.size, self.meta, images[1]))

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"prompts": self.prompts, "dialogue": self.dialogue, "targets_packed": self.targets_packed,
                   "embeddings": self.embeddings, "valid_hw": self.valid_hw}
        if self.images is not None:
            tensors["images"] = self.images
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"size": str(self.size), "meta": json.dumps(self.meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, paths) -> "FeatureSet":
        """One file, or several (a list, or names joined by commas) concatenated in order."""
        from safetensors import safe_open

        if isinstance(paths, (str, Path)):
            paths = [p for p in str(paths).split(",") if p]
        parts = []
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no feature file (build one with python -m "
                                        "MediRoundCore.train.jcm_features)")
            with safe_open(str(path), framework="pt") as handle:
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                info = handle.metadata() or {}
            parts.append(cls(tensors["prompts"], tensors["dialogue"], tensors["targets_packed"],
                             tensors["embeddings"], tensors["valid_hw"], int(info["size"]),
                             json.loads(info.get("meta", "{}")), tensors.get("images")))
        return cls.concat(parts)

    @classmethod
    def concat(cls, parts: list["FeatureSet"]) -> "FeatureSet":
        if not parts:
            raise ValueError("no feature sets to join")
        if len({p.size for p in parts}) != 1:
            raise ValueError("feature sets of different segmenter sizes")
        offsets = np.cumsum([0] + [p.num_dialogues for p in parts[:-1]])
        meta = dict(parts[0].meta, parts=[p.meta for p in parts]) if len(parts) > 1 else parts[0].meta
        dialogue = torch.cat([p.dialogue + int(o) for p, o in zip(parts, offsets)])
        with_images = [p.images is not None for p in parts]
        if any(with_images) and not all(with_images):
            raise ValueError("some feature sets keep images and some do not (add them with --add-images)")
        images = torch.cat([p.images for p in parts]) if all(with_images) else None
        return cls(torch.cat([p.prompts for p in parts]), dialogue,
                   torch.cat([p.targets_packed for p in parts]), torch.cat([p.embeddings for p in parts]),
                   torch.cat([p.valid_hw for p in parts]), parts[0].size, meta, images)


class _Accumulator:
    """Collects rounds and dialogues into a FeatureSet."""

    def __init__(self, size: int):
        self.size = size
        self.prompts, self.dialogue, self.targets, self.embeddings, self.valid_hw = [], [], [], [], []
        self.images = []

    def add_dialogue(self, embedding: torch.Tensor, valid_hw, prompts: torch.Tensor, targets: torch.Tensor,
                     seg_pixels: torch.Tensor) -> None:
        d = len(self.embeddings)
        self.images.append(segmenter_image(seg_pixels)[None])
        self.embeddings.append(embedding.detach().float().cpu().to(torch.float16).reshape(1, *embedding.shape[-3:]))
        self.valid_hw.append(torch.tensor([list(valid_hw)]))
        self.prompts.append(prompts.detach().float().cpu())
        self.targets.append(FeatureSet.pack(targets.cpu()))
        self.dialogue.append(torch.full((len(prompts),), d, dtype=torch.long))

    def build(self, meta: dict) -> FeatureSet:
        return FeatureSet(torch.cat(self.prompts), torch.cat(self.dialogue), torch.cat(self.targets),
                          torch.cat(self.embeddings), torch.cat(self.valid_hw), self.size, meta,
                          torch.cat(self.images))


def segmenter_image(seg_pixels: torch.Tensor) -> torch.Tensor:
    """(3,S,S) segmenter input → (S,S) float16 on the CPU: the image a refining correction looks at, stored."""
    return refiner_image(seg_pixels.detach()).cpu().to(torch.float16)


def add_images(path, config) -> FeatureSet:
    """Give a feature file collected without images its segmenter input images, regenerated from its split, seed
    and dialogue range (`config`: the model's, for the segmenter frame); checks each extent against the file's."""
    from ..data.splits import make_dialogue, to_sample
    from ..evaluate.protocol import sample_image
    from ..model.field_placement import slice_in_field
    from ..model.processing import segmenter_pixels

    features = FeatureSet.load(path)
    meta = features.meta
    names = meta["split"].split("+")
    images = []
    for i in range(meta["start"], meta["start"] + features.num_dialogues):
        sample = to_sample(make_dialogue(names[i % len(names)], meta["seed"], i // len(names)))
        shown, extent, _ = slice_in_field(sample_image(sample), config)  # as the engine showed it
        pixels, valid_hw = segmenter_pixels(shown, config, extent)
        if tuple(valid_hw) != tuple(features.valid_hw[len(images)].tolist()):
            raise ValueError(f"{path}: dialogue {i} regenerates with another extent: not the file's dialogues")
        images.append(segmenter_image(pixels)[None])
    features.images = torch.cat(images)
    features.save(path)
    return features


# -- collection ----------------------------------------------------------------------------------------------
def collect_predicted(engine, samples, progress=None) -> FeatureSet:
    """On-policy rounds: the protocol with dataset references and JCM off, predicted masks fed forward."""
    from ..evaluate.protocol import CONFIGS, config_reference, sample_fingerprint, sample_image
    from ..session import Session

    config = CONFIGS["ind-nojcm"]
    size = engine.model.config.segmenter.image_size
    acc = _Accumulator(size)
    for i, sample in enumerate(samples):
        image = sample_image(sample)
        session = Session(sample_fingerprint(sample), volume_name=f"features-{i}")
        prompts = []
        for k, query in enumerate(sample.queries):
            result = engine.ask(session, query, image, reference=config_reference(config, sample, k), use_jcm=False)
            prompts.append(result.raw_prompt)
        embedding, valid_hw = engine.slice_embedding(session, image)
        masks = engine.slice_padding(session, image).pad(np.asarray(sample.masks, bool))  # as the slice was padded
        targets = masks_to_segmenter_frame(masks, valid_hw, size)
        acc.add_dialogue(embedding, valid_hw, torch.stack(prompts), targets, engine.slice_pixels(session, image))
        engine.forget()
        if progress:
            progress(i + 1)
    return acc.build({"source": "predicted"})


@torch.no_grad()
def collect_teacher(model, tokenizer, samples, reference_noise: float = 0.3, batch_size: int = 8, seed: int = 0,
                    progress=None) -> FeatureSet:
    """Teacher-forced rounds, as streaming stage 2 sees them (ground-truth references, a share perturbed)."""
    from ..model.modeling import seg_hidden_states
    from ..model.processing import PromptBuilder
    from .batching import make_batch

    builder = PromptBuilder.for_model(tokenizer, model)
    rng = np.random.default_rng(seed)
    acc = _Accumulator(model.config.segmenter.image_size)
    it = iter(samples)
    done = 0
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk:
            break
        batch = make_batch(chunk, builder, model.config, reference_noise, rng).to(model.device)
        _, hidden = seg_hidden_states(model, batch)
        prompts = model.seg_prompts(hidden)
        embeddings = model.encode_segmenter_image(batch.seg_pixels)
        first = 0
        for b, n in enumerate(batch.rounds_per_sample):
            acc.add_dialogue(embeddings[b], batch.valid_hw[b], prompts[first:first + n],
                             batch.target_masks[first:first + n], batch.seg_pixels[b])
            first += n
        done += len(chunk)
        if progress:
            progress(done)
    return acc.build({"source": "teacher", "reference_noise": reference_noise})


def main(argv=None) -> int:
    from ..data.splits import make_dialogue, to_sample
    from ..engine import DEFAULT_CHECKPOINT, Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="the frozen (stage-1) model")
    p.add_argument("--source", choices=SOURCES, default="predicted")
    p.add_argument("--split", default="train-long", help="training split(s) joined by '+' (default train-long)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first dialogue index (shards run in parallel)")
    p.add_argument("--dialogues", type=int, default=500)
    p.add_argument("--reference-noise", type=float, default=0.3, help="teacher source: share of perturbed references")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda if present; bf16 there)")
    p.add_argument("--out", help="the feature file to write")
    p.add_argument("--add-images", metavar="FILE", help="instead: add the segmenter input images to FILE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.add_images:
        from ..checkpoints.ours import read_config

        features = add_images(args.add_images, read_config(args.checkpoint)[0])
        print(f"images of {features.num_dialogues} dialogues -> {args.add_images}")
        return 0
    if not args.out:
        p.error("--out is required (or --add-images FILE)")
    names = args.split.split("+")
    samples = (to_sample(make_dialogue(names[i % len(names)], args.seed, i // len(names)))
               for i in range(args.start, args.start + args.dialogues))
    t0 = time.perf_counter()

    def say(done):
        if done % 50 == 0 or done == args.dialogues:
            rate = done / (time.perf_counter() - t0)
            print(f"{done}/{args.dialogues} dialogues ({rate:.2f}/s)", flush=True)

    engine = Engine.load(args.checkpoint, device=args.device)
    if args.source == "predicted":
        features = collect_predicted(engine, samples, say)
    else:
        features = collect_teacher(engine.model, engine.tokenizer, samples, args.reference_noise, seed=args.seed,
                                   progress=say)
    features.meta.update(split=args.split, seed=args.seed, start=args.start, dialogues=args.dialogues,
                         checkpoint=str(args.checkpoint))
    features.save(args.out)
    print(f"{len(features)} rounds of {features.num_dialogues} dialogues -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
