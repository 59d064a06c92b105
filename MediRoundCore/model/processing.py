"""Inputs of the model: slice pixels for the segmenter and the vision tower, reference crops and boxes,
and the token layout of a conversation (one function per piece, so training and inference agree exactly)."""

from __future__ import annotations

import re

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import MediRoundConfig
from .tokenizer import TokenIds

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


def pad_offsets(input_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(top, left) of a resized slice of `input_hw` inside the size×size model frame: centred. A slice with a
    place in the model's field arrives already padded to it (`model/field_placement.py`), so centring the padded
    slice puts its anatomy there; one without is centred (docs/design-notes.md, "Non-square slices")."""
    return (size - int(input_hw[0])) // 2, (size - int(input_hw[1])) // 2


def frame_shares(slice_hw: tuple[int, int], extent: tuple[float, float] | None = None) -> tuple[float, float]:
    """The slice's height and width as shares of the model's square frame. `extent` is the slice's physical
    height and width as shares of the model's field of view (`SliceImage.frame_extent`): a slice inside that field
    keeps the training scale and is padded, so anatomy looks as large as in training however the scan's field of
    view was cut; a larger slice, or one of unknown extent (None), fills the frame along its longest side."""
    h, w = slice_hw
    er, ec = (float(h), float(w)) if extent is None else (float(extent[0]), float(extent[1]))
    if er <= 0 or ec <= 0:
        raise ValueError(f"frame extent must be positive, got {extent!r}")
    k = 1.0 / max(er, ec) if extent is None or max(er, ec) > 1.0 else 1.0
    return er * k, ec * k


def frame_hw(slice_hw: tuple[int, int], size: int, extent: tuple[float, float] | None = None) -> tuple[int, int]:
    """(rows, cols) the slice is resized to inside the size×size frame (`frame_shares`)."""
    fr, fc = frame_shares(slice_hw, extent)
    return max(1, round(fr * size)), max(1, round(fc * size))


def _into_frame(img: torch.Tensor, size: int, extent=None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize (C,H,W) to its `frame_hw`, then zero-pad to size×size, centred (`pad_offsets`)."""
    h, w = img.shape[-2:]
    nh, nw = frame_hw((h, w), size, extent)
    if (nh, nw) != (h, w):
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=nh < h or nw < w)[0]
    top, left = pad_offsets((nh, nw), size)
    return F.pad(img, (left, size - nw - left, top, size - nh - top)), (nh, nw)


def frame_box(box: tuple[int, int, int, int], slice_hw: tuple[int, int], extent=None) -> list[float]:
    """A pixel box (x0, y0, x1, y1) of a slice of `slice_hw` normalised to the square frame the model sees the
    slice in (`frame_shares`, centred as `pad_offsets`; a slice padded to its place in the field is given padded):
    [x0/W, y0/H, x1/W, y1/H] for a square slice that fills the frame."""
    h, w = slice_hw
    fr, fc = frame_shares(slice_hw, extent)
    oy, ox = (1.0 - fr) / 2, (1.0 - fc) / 2
    x0, y0, x1, y1 = box
    return [ox + x0 / w * fc, oy + y0 / h * fr, ox + x1 / w * fc, oy + y1 / h * fr]


def segmenter_pixels(slice01: np.ndarray, config: MediRoundConfig, extent=None) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3,S,S) segmenter input from a [0,1] slice, and the resized size before padding (`frame_hw`). The padding
    is black (0 in [0,1], what lies outside a body) and normalised with the image, not a zero after normalisation
    (the channel mean, a grey band the model never saw)."""
    img = torch.as_tensor(np.ascontiguousarray(slice01), dtype=torch.float32)[None]
    img, input_hw = _into_frame(img, config.segmenter.image_size, extent)
    img = img.expand(3, -1, -1)
    if config.segmenter_normalization == "sam_mean_std":
        img = (img * 255.0 - torch.tensor(SAM_MEAN)[:, None, None]) / torch.tensor(SAM_STD)[:, None, None]
    return img, input_hw


def vision_pixels(slice01: np.ndarray, config: MediRoundConfig, extent=None) -> torch.Tensor:
    """(3,S,S) vision-tower input (CLIP normalisation) from a [0,1] image, framed and padded like `segmenter_pixels`."""
    img = torch.as_tensor(np.ascontiguousarray(slice01), dtype=torch.float32)[None]
    img = _into_frame(img, config.vision.image_size, extent)[0].expand(3, -1, -1)
    return (img - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive-exclusive pixel box (x0, y0, x1, y1) of a mask, or None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def reference_inputs(slice01: np.ndarray, mask: np.ndarray, config: MediRoundConfig,
                     extent=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The referenced round's crop (masked, cropped to its box, padded square; vision-tower pixels) and its
    box normalised in the square frame the model sees the slice in (`frame_box`; [x0/W, y0/H, x1/W, y1/H] for a
    square slice). An empty mask gives a blank crop and a zero box."""
    h, w = slice01.shape
    box = mask_box(mask)
    if box is None:
        return vision_pixels(np.zeros((8, 8), np.float32), config), torch.zeros(4)
    x0, y0, x1, y1 = box
    crop = (slice01 * (mask > 0))[y0:y1, x0:x1].astype(np.float32)
    side = max(crop.shape)
    square = np.zeros((side, side), np.float32)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
    return vision_pixels(square, config), torch.tensor(frame_box(box, (h, w), extent), dtype=torch.float32)


def masks_to_segmenter_frame(masks: np.ndarray, input_hw: tuple[int, int], size: int) -> torch.Tensor:
    """(R,H,W) bool masks → (R,S,S) float targets in the padded segmenter frame."""
    t = torch.as_tensor(masks.astype(np.float32))[:, None]
    t = F.interpolate(t, size=input_hw, mode="bilinear", align_corners=False) if t.shape[-2:] != input_hw else t
    top, left = pad_offsets(input_hw, size)
    t = F.pad(t, (left, size - input_hw[1] - left, top, size - input_hw[0] - top))
    return (t[:, 0] > 0.5).float()


def logits_to_slice(low_res: torch.Tensor, input_hw: tuple[int, int], size: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """(K,1,h,w) mask logits → (K,H,W) logits at slice resolution (upsample, unpad, resize)."""
    x = F.interpolate(low_res.float(), size=(size, size), mode="bilinear", align_corners=False)
    top, left = pad_offsets(input_hw, size)
    x = x[..., top:top + input_hw[0], left:left + input_hw[1]]
    return F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)[:, 0]


# -- token layout ---------------------------------------------------------------------------------------
@dataclass
class PromptBuilder:
    """Token ids of each piece of a conversation. A sequence is prefix + Σ(user + answer) rounds."""

    tokenizer: object
    ids: TokenIds
    template: str
    num_image_tokens: int
    round_tags: bool = False  # MediRoundConfig.round_tags

    @classmethod
    def for_model(cls, tokenizer, model) -> "PromptBuilder":
        """The builder of a model's prompts (its template, image tokens and round tags)."""
        config = model.config
        return cls(tokenizer, model.token_ids, config.chat_template, config.vision.num_patches,
                   getattr(config, "round_tags", False))

    def _encode(self, text: str) -> list[int]:
        if self.template == "plain":
            text = text.lower()
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prefix(self) -> list[int]:
        """Start of the sequence: BOS, the image placeholders of the current slice."""
        opener = self._encode("[INST] ") if self.template == "llava_mistral" else []
        return [self.ids.bos] + opener + [self.ids.image] * self.num_image_tokens + self._encode("\n")

    def user(self, query: str, has_reference: bool, first: bool, number: int | None = None,
             reference: int | None = None, reference_entity: str | None = None) -> list[int]:
        """A user turn, through the start of the answer. With round tags (`number`: this round's, `reference`:
        the referenced round's, `reference_entity`: what that round segmented, where known), the query says
        "(about round M: <entity>)" and the answer opens with "round N:"."""
        ref = [self.ids.crop, self.ids.box] if has_reference else []
        query = query.strip()
        opening = []
        if self.round_tags:
            if number is None:
                raise ValueError("this model's prompts carry round numbers: give the round's number")
            if reference is not None:
                about = f"round {reference}: {reference_entity.strip()}" if reference_entity else f"round {reference}"
                query = f"(about {about}) {query}"
            opening = self._encode(f" round {number}:")
        if self.template == "llava_mistral":
            head = [] if first else self._encode("[INST] ")
            return head + ref + self._encode(" " + query + " [/INST]") + opening
        return self._encode("user:") + ref + self._encode(" " + query + "\nassistant:") + opening

    def answer(self, answer_text: str) -> list[int]:
        """Answer tokens, then [SEG] and EOS (the answer text is given without the [SEG] marker)."""
        return self._encode(" " + answer_text.strip()) + [self.ids.seg, self.ids.eos]

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return tidy_wordpiece(text) if _is_wordpiece(self.tokenizer) else text


def _is_wordpiece(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordPiece"


_WORD_JOINERS = re.compile(r"(\w) ([-/]) (?=\w)")
_CONTRACTION = re.compile(r"(\w) ' (s|t|re|ve|ll|d|m)\b")
_DECIMAL = re.compile(r"(\d) ?\. ?(?=\d)")


def tidy_wordpiece(text: str) -> str:
    """Text decoded from WordPiece ids (lite's MiniLM tokenizer splits off every punctuation mark and decodes
    "left kidney : it lies on the patient ' s left") as it was written: "left kidney: it lies on the patient's
    left". Re-encoding gives the same ids; a spaced dash between two words cannot be told from a hyphen."""
    text = _DECIMAL.sub(r"\1.", text)
    text = _CONTRACTION.sub(r"\1'\2", text)
    text = _WORD_JOINERS.sub(r"\1\2", text)
    text = re.sub(r" ([.,;:!?)\]%])", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text)
