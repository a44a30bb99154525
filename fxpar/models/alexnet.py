"""AlexNet (Krizhevsky et al. 2012), single tower, as in the common reference definition.

Five convolutions with ReLU and three overlapping max-pools, an adaptive average pool, and three
fully connected layers with dropout. At ``image_size >= 64`` the layers are the standard ones
(11x11 stride-4 stem, a 6x6 pool, 9216 -> 4096 -> 4096 -> classes). Smaller images (CIFAR-sized)
get a 3x3 stride-1 stem and a 2x2 pool so every layer keeps a spatial extent; the rest is
unchanged. ``width`` scales every channel and hidden size (1.0 is the standard model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxpar.models.layers import Dropout, ModelConfigError, scaled


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = 224, *, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in (64, 192, 384, 256, 256))
        hidden = scaled(4096, width)
        small = image_size < 64
        if small and image_size < 15:
            raise ModelConfigError(
                f"AlexNet's three 3x3 stride-2 max-pools need image_size >= 15; got {image_size} (use 32 for small images)"
            )
        stem = nn.Conv2d(3, c1, kernel_size=3, stride=1, padding=1) if small else nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2)
        self.features = nn.Sequential(
            stem,
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        pool = 2 if small else 6
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            Dropout(dropout),
            nn.Linear(c5 * pool * pool, hidden),
            nn.ReLU(),
            Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return F.cross_entropy(self.classifier(torch.flatten(x, 1)), y)

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images ``[batch, 3, image_size, image_size]`` and labels ``[batch]``."""
        device = next(self.parameters()).device
        x = torch.randn(batch, 3, self.image_size, self.image_size, device=device)
        return x, torch.randint(0, self.num_classes, (batch,), device=device)
