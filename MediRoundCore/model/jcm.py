"""Judgment & Correction Mechanism (JCM): scores the 256-d [SEG] prompt and corrects poor ones.

Quality MLP 256→512→512→1 (GELU, sigmoid); correction MLP 256→512→512→256 (GELU). At inference, a score
≤ β sends the embedding through the correction MLP before decoding (paper, Algorithm 1). With
`residual=True` the correction is added to the embedding (e + MLP(e)) and starts as the identity. With
`context=True` (our option) the MLP input also receives a projection of the prompt's first decode (the image
embedding pooled under the unrefined mask, and the decoder's mask token): e + MLP(e + W·context). With
`attention=True` as well, the context also holds what the mask token reads from the whole image embedding
(`MaskAttention`: every location marked by the first decode's mask probability), so the correction can see
what lies around the mask, not only its mean. With `refiner=True` (our option) a corrected mask is also
redrawn at the segmenter's full input resolution around itself (`MaskRefiner`): SAM's decoder draws at a
quarter of it, too coarse for lesions a few pixels wide.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CONTEXT_PARTS = 2  # the context of a correction: pooled image embedding and mask token, each `dim` wide


class MaskAttention(nn.Module):
    """The first decode's mask token attends over the image embedding, each location marked as inside or
    outside the unrefined mask (by its probability there): a `dim`-wide reading of the mask's surroundings."""

    def __init__(self, dim: int = 256, num_heads: int = 8):
        super().__init__()
        self.inside = nn.Parameter(torch.randn(dim) * 0.1)
        self.outside = nn.Parameter(torch.randn(dim) * 0.1)
        self.norm_keys = nn.LayerNorm(dim)
        self.norm_query = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, query: torch.Tensor, image_embeddings: torch.Tensor, positional: torch.Tensor,
                mask_probs: torch.Tensor) -> torch.Tensor:
        """query (K,dim); image_embeddings (K,dim,g,g); positional (1,dim,g,g); mask_probs (K,1,g,g) → (K,dim)."""
        tokens = (image_embeddings + positional).flatten(2).transpose(1, 2)
        marks = mask_probs.flatten(2).transpose(1, 2)
        keys = self.norm_keys(tokens) + marks * self.inside + (1 - marks) * self.outside
        out, _ = self.attention(self.norm_query(query)[:, None], keys, keys, need_weights=False)
        return out[:, 0]


def refiner_image(seg_pixels: torch.Tensor) -> torch.Tensor:
    """(…,3,S,S) segmenter input → (…,S,S) float32: the one-channel image a `MaskRefiner` looks at."""
    return seg_pixels.float().mean(-3)


class MaskRefiner(nn.Module):
    """Redraws a mask at the segmenter's full resolution, around itself, from the slice and its logits.

    SAM's decoder draws masks at a quarter of the input resolution (64² for a 256² input), so a lesion a few
    pixels wide spans a handful of cells and comes out blurred and over-drawn. The refiner takes a square
    around the mask (its box grown by half, plus a margin), resamples the slice and the logits to crop² (small
    masks are magnified), runs a small dilated convolution net and adds its output to the logits inside the
    square. The last layer starts at zero: an untrained refiner is the identity."""

    def __init__(self, channels: int = 32, crop: int = 48, margin: float = 8.0, min_side: float = 24.0,
                 dilations: tuple[int, ...] = (1, 2, 4, 1)):
        super().__init__()
        self.crop, self.margin, self.min_side = crop, margin, min_side
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in dilations)
        self.head = nn.Conv2d(channels, 1, 1)
        self.act = nn.GELU()
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def squares(self, logits: torch.Tensor) -> torch.Tensor:
        """(K,S,S) logits → (K,3) centre x, centre y and half side (pixels) of the square each mask is redrawn
        in; an empty mask gets a square of the minimum side around its highest logit."""
        k, h, w = logits.shape
        inside = logits > 0
        xs = torch.arange(w, device=logits.device, dtype=torch.float32)
        ys = torch.arange(h, device=logits.device, dtype=torch.float32)
        cols, rows = inside.any(1), inside.any(2)
        big = float(max(h, w))
        x0 = torch.where(cols, xs, big).amin(1)
        x1 = torch.where(cols, xs + 1, -big).amax(1)
        y0 = torch.where(rows, ys, big).amin(1)
        y1 = torch.where(rows, ys + 1, -big).amax(1)
        peak = logits.flatten(1).argmax(1)
        empty = ~inside.flatten(1).any(1)
        px, py = (peak % w).float() + 0.5, (peak // w).float() + 0.5
        cx = torch.where(empty, px, (x0 + x1) / 2)
        cy = torch.where(empty, py, (y0 + y1) / 2)
        side = torch.where(empty, torch.zeros_like(cx), torch.maximum(x1 - x0, y1 - y0))
        half = (0.75 * side + self.margin).clamp(min=self.min_side / 2)
        return torch.stack([cx, cy, half], 1)

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """image (K,S,S) segmenter input, logits (K,S,S) at the same resolution → refined logits (K,S,S), in the
        logits' dtype (the crops are resampled in float32 whatever the model's dtype)."""
        k, size = logits.shape[0], logits.shape[-1]
        squares = self.squares(logits.detach())
        cx, cy, half = squares.unbind(1)
        scale = 2 * half / size  # crop → frame (normalised coordinates, align_corners=False)
        zero = torch.zeros_like(scale)
        theta = torch.stack([torch.stack([scale, zero, 2 * cx / size - 1], 1),
                             torch.stack([zero, scale, 2 * cy / size - 1], 1)], 1)
        grid = F.affine_grid(theta, (k, 1, self.crop, self.crop), align_corners=False)
        image_crop = F.grid_sample(image[:, None].float(), grid, align_corners=False)
        mean = image_crop.mean((2, 3), keepdim=True)
        std = image_crop.std((2, 3), keepdim=True).clamp(min=1e-3)
        logit_crop = F.grid_sample(logits[:, None].float(), grid, align_corners=False, padding_mode="border")
        magnification = torch.log(self.crop / (2 * half)).reshape(k, 1, 1, 1).expand_as(logit_crop)
        inputs = torch.cat([(image_crop - mean) / std, logit_crop.sigmoid(), magnification], 1)
        x = self.act(self.stem(inputs.to(self.stem.weight.dtype)))
        for block in self.blocks:
            x = x + self.act(block(x))
        delta = self.head(x).float()  # resampled back in float32, like the crops
        inverse = torch.stack([torch.stack([1 / scale, zero, (size / 2 - cx) / half], 1),
                               torch.stack([zero, 1 / scale, (size / 2 - cy) / half], 1)], 1)
        back = F.affine_grid(inverse, (k, 1, logits.shape[-2], size), align_corners=False)
        return logits + F.grid_sample(delta, back, align_corners=False)[:, 0].to(logits.dtype)


class QualityMLP(nn.Module):
    def __init__(self, dim: int = 256, hidden_dim: int = 512):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, 1)
        self.act = nn.GELU()

    def forward(self, seg_embedding: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc2(self.act(self.fc1(seg_embedding))))
        return torch.sigmoid(self.fc3(x)).squeeze(-1)


class CorrectionMLP(nn.Module):
    def __init__(self, dim: int = 256, hidden_dim: int = 512, residual: bool = False, context: bool = False,
                 attention: bool = False):
        super().__init__()
        if attention and not context:
            raise ValueError("an attending correction reads the first decode: it needs context=True")
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()
        self.residual = residual
        self.attention = MaskAttention(dim) if attention else None
        self.context = nn.Linear((CONTEXT_PARTS + int(attention)) * dim, dim) if context else None
        if residual:
            self.reset_to_identity()
        if context:
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)

    def reset_to_identity(self) -> None:
        """Zero the last layer: with `residual`, the correction then returns its input unchanged."""
        nn.init.zeros_(self.fc3.weight)
        nn.init.zeros_(self.fc3.bias)

    def forward(self, seg_embedding: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = seg_embedding
        if self.context is not None:
            if context is None:
                raise ValueError("this correction was built with context=True: pass the first decode's context")
            x = x + self.context(context.to(x.dtype))
        delta = self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))
        return seg_embedding + delta if self.residual else delta


class JudgmentCorrection(nn.Module):
    def __init__(self, dim: int = 256, hidden_dim: int = 512, residual_correction: bool = False,
                 correction_context: bool = False, correction_attention: bool = False,
                 correction_refiner: bool = False):
        super().__init__()
        self.quality = QualityMLP(dim, hidden_dim)
        self.correction = CorrectionMLP(dim, hidden_dim, residual_correction, correction_context,
                                        correction_attention)
        self.refiner = MaskRefiner() if correction_refiner else None

    @property
    def uses_context(self) -> bool:
        return self.correction.context is not None

    def forward(self, seg_embedding: torch.Tensor, beta: float,
                context_of: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (embedding to decode, quality score, corrected flag) for a batch of embeddings.

        Only the embeddings scored ≤ β go through the correction; a context-aware one gets their context from
        `context_of(rows)`, so the first decode it needs runs for those rows alone."""
        score = self.quality(seg_embedding)
        corrected = score <= beta
        if not bool(corrected.any()):
            return seg_embedding, score, corrected
        rows = corrected.nonzero().squeeze(-1)
        context = context_of(rows) if self.uses_context else None
        out = seg_embedding.clone()
        out[rows] = self.correction(seg_embedding[rows], context)
        return out, score, corrected


def build_jcm(config) -> JudgmentCorrection:
    """The JCM a `MediRoundConfig` describes (prompt width, hidden width, plain or residual correction, context,
    attention, full-resolution refiner)."""
    return JudgmentCorrection(config.segmenter.prompt_dim, config.jcm.hidden_dim, config.jcm.residual_correction,
                              config.jcm.correction_context, config.jcm.correction_attention,
                              config.jcm.correction_refiner)
