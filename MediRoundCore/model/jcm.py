"""Judgment & Correction Mechanism (JCM): scores the 256-d [SEG] prompt and corrects poor ones.

Quality MLP 256→512→512→1 (GELU, sigmoid); correction MLP 256→512→512→256 (GELU). At inference, a score
≤ β sends the embedding through the correction MLP before decoding (paper, Algorithm 1). With
`residual=True` the correction is added to the embedding (e + MLP(e)) and starts as the identity. With
`context=True` (our option) the MLP input also receives a projection of the prompt's first decode (the image
embedding pooled under the unrefined mask, and the decoder's mask token): e + MLP(e + W·context). With
`attention=True` as well, the context also holds what the mask token reads from the whole image embedding
(`MaskAttention`: every location marked by the first decode's mask probability), so the correction can see
what lies around the mask, not only its mean.
"""

from __future__ import annotations

from typing import Callable

import torch
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
                 correction_context: bool = False, correction_attention: bool = False):
        super().__init__()
        self.quality = QualityMLP(dim, hidden_dim)
        self.correction = CorrectionMLP(dim, hidden_dim, residual_correction, correction_context,
                                        correction_attention)

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
    attention)."""
    return JudgmentCorrection(config.segmenter.prompt_dim, config.jcm.hidden_dim, config.jcm.residual_correction,
                              config.jcm.correction_context, config.jcm.correction_attention)
