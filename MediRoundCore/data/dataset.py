"""A torch Dataset over an MR-MedSeg folder (real or generated), yielding typed `Sample`s."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..answers import SEG_TOKEN, parse_entity
from ..errors import DatasetError
from .mrmedseg import Conversation, read_conversations


@dataclass
class Sample:
    """One conversation ready for a model: image, per-round queries/answers/masks and references."""

    image: np.ndarray                 # float32 (H, W) in [0, 1]
    queries: list[str]
    answers: list[str]                # "<entity>: <rationale>. [SEG]" (or "<public text> [SEG]")
    masks: np.ndarray                 # bool (R, H, W)
    ref_indices: list[int | None]
    entities: list[str | None]
    image_path: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_rounds(self) -> int:
        return len(self.queries)


def answer_with_seg(answer_text: str) -> str:
    """The answer text in the model's form: what the file says, then " [SEG]"."""
    text = answer_text.strip()
    return f"{text} {SEG_TOKEN}" if text else SEG_TOKEN


def answer_entity(answer_text: str) -> str | None:
    """The entity of an answer "entity: rationale." (None for public-style text such as "This part is:")."""
    entity = parse_entity(answer_text)
    if entity is None or not answer_text.split(":", 1)[1].strip():
        return None
    return entity


def load_gray(path: Path) -> np.ndarray:
    """A PNG as float32 in [0, 1] (RGB is converted to luminance, 16-bit scaled by 65535)."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            return np.clip(arr / 65535.0, 0, 1).astype(np.float32)
        return (np.asarray(im.convert("L"), dtype=np.float32) / 255.0)


def load_mask(path: Path) -> np.ndarray:
    """A mask PNG as bool: foreground is 255 (as the public loader reads it)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "P") else im)
    if arr.dtype == bool:
        return arr
    return arr == 255


def conversation_to_sample(conv: Conversation, root: Path) -> Sample:
    """Load the image and masks of one conversation."""
    image = load_gray(root / conv.image_path)
    masks = np.stack([load_mask(root / r.mask_path) for r in conv.rounds])
    if masks.shape[1:] != image.shape:
        raise DatasetError(f"{root}: masks of {conv.image_path!r} are {masks.shape[1:]} but the image is {image.shape}")
    return Sample(
        image=image,
        queries=[r.query for r in conv.rounds],
        answers=[answer_with_seg(r.answer_text) for r in conv.rounds],
        masks=masks,
        ref_indices=[r.ref_index for r in conv.rounds],
        entities=[answer_entity(r.answer_text) for r in conv.rounds],
        image_path=conv.image_path,
        meta=dict(conv.extra.get("meta", {})),
    )


def find_dataset_json(folder: Path) -> Path:
    """The single *.json file of a dataset folder."""
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if len(files) != 1:
        raise DatasetError(f"{folder}: expected exactly one dataset .json file, found {[p.name for p in files]}")
    return files[0]


class MRMedSegDataset(torch.utils.data.Dataset):
    """Conversations of an MR-MedSeg folder (`json_path` defaults to the folder's single .json file)."""

    def __init__(self, folder, json_path=None, *, check: bool = True):
        self.root = Path(folder)
        self.json_path = Path(json_path) if json_path is not None else find_dataset_json(self.root)
        self.conversations = read_conversations(self.json_path, self.root, check=check)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Sample:
        return conversation_to_sample(self.conversations[index], self.root)


def collate_samples(samples: list[Sample]) -> list[Sample]:
    """Batches stay lists of samples; the model-side processor tokenizes and pads."""
    return list(samples)
