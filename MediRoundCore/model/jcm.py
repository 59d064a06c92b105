"""Judgment & Correction Mechanism (JCM): scores the 256-d [SEG] prompt and corrects poor ones.

Quality MLP 256→512→512→1 (GELU, sigmoid); correction MLP 256→512→512→256 (GELU). At inference, a score
≤ β sends the embedding through the correction MLP before decoding (paper, Algorithm 1).
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
    def __init__(self, dim: int = 256, hidden_dim: int = 512):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, seg_embedding: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(seg_embedding)))))


class JudgmentCorrection(nn.Module):
    def __init__(self, dim: int = 256, hidden_dim: int = 512):
        super().__init__()
        self.quality = QualityMLP(dim, hidden_dim)
        self.correction = CorrectionMLP(dim, hidden_dim)

    def forward(self, seg_embedding: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (embedding to decode, quality score, corrected flag) for a batch of embeddings."""
        score = self.quality(seg_embedding)
        corrected = score <= beta
        refined = self.correction(seg_embedding)
        out = torch.where(corrected.unsqueeze(-1), refined, seg_embedding)
        return out, score, corrected
