"""Judgment & Correction Mechanism (JCM): scores the 256-d [SEG] prompt and corrects poor ones.

Quality MLP 256→512→512→1 (GELU, sigmoid); correction MLP 256→512→512→256 (GELU). At inference, a score
≤ β sends the embedding through the correction MLP before decoding (paper, Algorithm 1). With
`residual=True` the correction is added to the embedding (e + MLP(e)) and starts as the identity.
"""

from __future__ import annotations

import torch
from torch import nn


class QualityMLP(nn.Module):
    def __init__(self, dim: int = 256, hidden_dim: int = 512):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, 1)
        self.act = nn.GELU()

    def forward(self, seg_embedding: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc2(self.act(self.fc1(seg_embedding))))
        return torch.sigmoid(self.fc3(x)).squeeze(-1)


class CorrectionMLP(nn.Module):
    def __init__(self, dim: int = 256, hidden_dim: int = 512, residual: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()
        self.residual = residual
        if residual:
            self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Zero the last layer: with `residual`, the correction then returns its input unchanged."""
        nn.init.zeros_(self.fc3.weight)
        nn.init.zeros_(self.fc3.bias)

    def forward(self, seg_embedding: torch.Tensor) -> torch.Tensor:
        delta = self.fc3(self.act(self.fc2(self.act(self.fc1(seg_embedding)))))
        return seg_embedding + delta if self.residual else delta


class JudgmentCorrection(nn.Module):
    def __init__(self, dim: int = 256, hidden_dim: int = 512, residual_correction: bool = False):
        super().__init__()
        self.quality = QualityMLP(dim, hidden_dim)
        self.correction = CorrectionMLP(dim, hidden_dim, residual_correction)

    def forward(self, seg_embedding: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (embedding to decode, quality score, corrected flag) for a batch of embeddings."""
        score = self.quality(seg_embedding)
        corrected = score <= beta
        refined = self.correction(seg_embedding)
        out = torch.where(corrected.unsqueeze(-1), refined, seg_embedding)
        return out, score, corrected


def build_jcm(config) -> JudgmentCorrection:
    """The JCM a `MediRoundConfig` describes (prompt width, hidden width, plain or residual correction)."""
    return JudgmentCorrection(config.segmenter.prompt_dim, config.jcm.hidden_dim, config.jcm.residual_correction)
