"""Turn dialogue samples into the tensors of one teacher-forced training step.

A sample (see `MediRoundCore.data.dataset.Sample`) has an image in [0,1], and per round a query, an answer in
the `entity: rationale. [SEG]` form, a ground-truth mask and the index of the round it refers to. References
use the ground-truth masks of the referenced rounds (teacher forcing), as in the paper; with
`reference_noise` > 0 a share of them is replaced by a prediction-like perturbation (see `reference_noise`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..answers import strip_seg
from ..model.field_placement import into_field
from ..model.processing import (PromptBuilder, masks_to_segmenter_frame, reference_inputs, segmenter_pixels,
                                vision_pixels)
from .reference_noise import perturb_reference

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B,L)
    attention_mask: torch.Tensor  # (B,L)
    labels: torch.Tensor  # (B,L), IGNORE outside answers
    seg_positions: torch.Tensor  # (K,2): (sample, position of the hidden state that predicts [SEG])
    seg_pixels: torch.Tensor  # (B,3,S,S)
    vision_pixels: torch.Tensor  # (B,3,s,s)
    crop_pixels: torch.Tensor | None  # (C,3,s,s) in reading order
    boxes: torch.Tensor | None  # (C,4)
    target_masks: torch.Tensor  # (K,S,S) in the segmenter frame
    valid_hw: list[tuple[int, int]]  # per sample, the unpadded extent in the segmenter frame
    rounds_per_sample: list[int]

    def to(self, device):
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


def segmented_rounds(sample) -> list[int]:
    """Rounds that end in a segment: all but absent-target rounds (answered as absent, without [SEG])."""
    from ..data.absent import is_absent_answer

    return [r for r, answer in enumerate(sample.answers) if not is_absent_answer(answer)]


def sample_tokens(sample, builder: PromptBuilder) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, seg positions) of one dialogue. An absent-target round's answer ends with EOS and no
    [SEG]: the model learns to say so and draw nothing."""
    ids, labels, seg_positions = builder.prefix(), [], []
    labels = [IGNORE] * len(ids)
    segmented = set(segmented_rounds(sample))
    for r, (query, answer) in enumerate(zip(sample.queries, sample.answers)):
        ref = sample.ref_indices[r]
        user = builder.user(query, ref is not None, first=r == 0, number=r + 1, reference=None if ref is None else ref + 1,
                            reference_entity=None if ref is None or not sample.entities else sample.entities[ref])
        ans = builder.answer(strip_seg(answer))
        if r not in segmented:
            ans = ans[:-2] + [builder.ids.eos]
        ids += user
        labels += [IGNORE] * len(user)
        if r in segmented:
            seg_positions.append(len(ids) + len(ans) - 3)  # the position that predicts [SEG]
        ids += ans
        labels += ans
    return ids, labels, seg_positions


def sample_extent(sample, config) -> tuple[float, float] | None:
    """A training slice's share of the model's field of view: a crop records its share (`data/field_of_view.py`);
    None (the slice fills the frame, its aspect kept: a whole generated slice, or any slice of a model without a
    physical field)."""
    return shown_extent((sample.meta or {}).get("frame_extent"), config)


def shown_extent(extent, config) -> tuple[float, float] | None:
    """A recorded share of the field of view as the model uses it: None for a model without a physical field."""
    return tuple(extent) if extent is not None and config.field_of_view_mm else None


def sample_in_field(sample, config) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """A training slice and its masks as the model sees them, padded to the crop's place in the field
    (`model/field_placement.py`, as the engine's `slice_in_field`), and the padded slice's share of the field."""
    image, extent, padding = into_field(sample.image, sample_extent(sample, config),
                                        (sample.meta or {}).get("frame_shift"))
    return image, padding.pad(np.asarray(sample.masks, dtype=bool)), extent


def make_batch(samples, builder: PromptBuilder, config, reference_noise: float = 0.0,
               rng: np.random.Generator | None = None) -> Batch:
    """Tensors of one step; each reference mask is perturbed with probability `reference_noise` (uses `rng`)."""
    if reference_noise and rng is None:
        raise ValueError("reference_noise needs a random generator")
    size = config.segmenter.image_size
    rows, seg_pos, seg_px, vis_px, crops, boxes, targets, valid = [], [], [], [], [], [], [], []
    for b, sample in enumerate(samples):
        ids, labels, positions = sample_tokens(sample, builder)
        rows.append((ids, labels))
        seg_pos += [(b, p) for p in positions]
        image, masks, extent = sample_in_field(sample, config)
        px, hw = segmenter_pixels(image, config, extent)
        seg_px.append(px)
        valid.append(hw)
        vis_px.append(vision_pixels(image, config, extent))
        targets.append(masks_to_segmenter_frame(masks[segmented_rounds(sample)], hw, size))
        for ref in sample.ref_indices:
            if ref is not None:
                ref_mask = masks[ref]
                if reference_noise and rng.uniform() < reference_noise:
                    ref_mask = perturb_reference(ref_mask, rng)
                crop, box = reference_inputs(image, ref_mask, config, extent)
                crops.append(crop)
                boxes.append(box)
    length = max(len(ids) for ids, _ in rows)
    pad = builder.ids.pad
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    label_t = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (ids, labels) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        label_t[b, : len(labels)] = torch.tensor(labels)
        attention[b, : len(ids)] = 1
    return Batch(input_ids, attention, label_t, torch.tensor(seg_pos, dtype=torch.long), torch.stack(seg_px),
                 torch.stack(vis_px), torch.stack(crops) if crops else None, torch.stack(boxes) if boxes else None,
                 torch.cat(targets), valid, [len(segmented_rounds(s)) for s in samples])


class StreamBatches(torch.utils.data.IterableDataset):
    """Dialogues generated and batched in a worker process, overlapping the model's compute."""

    def __init__(self, stream, seed, batch_size, builder, config, reference_noise: float = 0.0):
        self.stream, self.seed, self.batch_size, self.builder, self.config = stream, seed, batch_size, builder, config
        self.reference_noise = reference_noise

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        seed = self.seed + 7919 * (worker.id if worker is not None else 0)  # workers after the first: other dialogues
        it = self.stream(seed)
        rng = np.random.default_rng(seed)
        while True:
            yield make_batch([next(it) for _ in range(self.batch_size)], self.builder, self.config,
                             self.reference_noise, rng)


def batches_in_workers(stream, seed: int, batch_size: int, builder, config, reference_noise: float = 0.0,
                       workers: int = 1, prefetch: int = 4):
    """An iterator of Batches that `workers` processes (one torch thread each) make from `stream(seed)`: with one
    worker, the batches `Trainer` would make itself, in the same order; further workers draw other seeds."""
    loader = torch.utils.data.DataLoader(StreamBatches(stream, seed, batch_size, builder, config, reference_noise),
                                         batch_size=None, num_workers=workers, prefetch_factor=prefetch,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    return iter(loader)

