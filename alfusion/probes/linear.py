"""Linear probes: one Linear layer on a flat feature vector."""

from __future__ import annotations

import torch
from torch import nn


class LinearProbe(nn.Module):
    """x: (B, F) -> logits (B, C)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
