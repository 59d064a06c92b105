"""A segmenter prompted by a box, as MedSAM and LiteMedSAM are trained and run: used to check base segmenter
weights against real labels (tests, probes) and as the segmenter's own task in pretraining."""

from __future__ import annotations

import numpy as np
import torch

from .processing import logits_to_slice, mask_box


def box_in_segmenter_frame(box: tuple[int, int, int, int], slice_hw: tuple[int, int], size: int,
                           margin: int = 0) -> torch.Tensor:
    """Pixel box (x0, y0, x1, y1; exclusive ends) of a slice → (1,4) box in the resized segmenter frame,
    grown by `margin` slice pixels on every side (MedSAM's `bbox_shift`)."""
    h, w = slice_hw
    x0, y0, x1, y1 = box
    x0, y0 = max(0, x0 - margin), max(0, y0 - margin)
    x1, y1 = min(w, x1 + margin), min(h, y1 + margin)
    scale = size / max(h, w)
    return torch.tensor([[x0 * scale, y0 * scale, x1 * scale, y1 * scale]], dtype=torch.float32)


@torch.inference_mode()
def box_prompted_logits(segmenter, image_embedding: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(1,1,h,w) low-res logits of SAM's single-mask output for one box (1,4) in the segmenter frame."""
    sparse, dense = segmenter.prompt_encoder(points=None, boxes=box.to(image_embedding.device), masks=None)
    logits, _ = segmenter.mask_decoder(image_embeddings=image_embedding, image_pe=segmenter.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
    return logits


def segment_in_box(segmenter, image_embedding: torch.Tensor, input_hw: tuple[int, int], label: np.ndarray,
                   margin: int = 0) -> np.ndarray:
    """The segmenter's mask (slice resolution) for the box around `label` (a 2D mask of the same slice)."""
    box = mask_box(label)
    if box is None:
        raise ValueError("the label is empty on this slice")
    size = segmenter.image_encoder.img_size
    prompt = box_in_segmenter_frame(box, label.shape, size, margin)
    logits = box_prompted_logits(segmenter, image_embedding, prompt)
    return (logits_to_slice(logits, input_hw, size, label.shape)[0] > 0).cpu().numpy()
