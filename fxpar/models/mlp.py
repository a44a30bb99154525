"""A multilayer perceptron classifier whose forward returns its cross-entropy loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (64, 256, 256, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return F.cross_entropy(x, y)

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, last = self.layers[0].in_features, self.layers[-1].out_features
        return torch.randn(batch, first), torch.randint(0, last, (batch,))
