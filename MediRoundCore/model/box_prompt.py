"""A segmenter prompted by a box, as MedSAM and LiteMedSAM are trained and run: used to check base segmenter
weights against real labels (tests, probes) and as the segmenter's own task in pretraining."""

from __future__ import annotations

import numpy as np
import torch

from .processing import logits_to_slice, mask_box, masks_to_segmenter_frame


def label_box_in_frame(label: np.ndarray, input_hw: tuple[int, int], size: int, margin: float = 0.0
                       ) -> torch.Tensor | None:
    """(1,4) box (x0, y0, x1, y1) in segmenter-frame pixels around a slice label, placed in the frame exactly as
    the slice is (`masks_to_segmenter_frame`), grown by `margin` frame pixels (MedSAM's `bbox_shift`);
    None for an empty label."""
    frame = masks_to_segmenter_frame(np.asarray(label, bool)[None], input_hw, size)[0].numpy() > 0
    box = mask_box(frame)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    return torch.tensor([[max(0.0, x0 - margin), max(0.0, y0 - margin), min(size, x1 + margin),
                          min(size, y1 + margin)]], dtype=torch.float32)


@torch.inference_mode()
def box_prompted_logits(segmenter, image_embedding: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(1,1,h,w) low-res logits of SAM's single-mask output for one box (1,4) in the segmenter frame."""
    sparse, dense = segmenter.prompt_encoder(points=None, boxes=box.to(image_embedding.device), masks=None)
    logits, _ = segmenter.mask_decoder(image_embeddings=image_embedding,
                                       image_pe=segmenter.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
    return logits


def segment_in_box(segmenter, image_embedding: torch.Tensor, input_hw: tuple[int, int], label: np.ndarray,
                   margin: float = 0.0) -> np.ndarray:
    """The segmenter's mask (slice resolution) for the box around `label` (a 2D mask of the same slice)."""
    size = segmenter.image_encoder.img_size
    box = label_box_in_frame(label, input_hw, size, margin)
    if box is None:
        raise ValueError("the label is empty on this slice")
    logits = box_prompted_logits(segmenter, image_embedding, box)
    return (logits_to_slice(logits, input_hw, size, label.shape)[0] > 0).cpu().numpy()
