"""VGG-16 (Simonyan & Zisserman 2015, configuration D), as in the common reference definition.

Thirteen 3x3 convolutions with ReLU in five stages separated by 2x2 max-pools, an adaptive average
pool, and three fully connected layers with dropout. The pool's output is 7x7 at 224x224 (the
standard model) and ``image_size // 32`` (at least 1) on a side otherwise, so small images keep
a small classifier input. ``width`` scales every channel and hidden size (1.0 is the standard
model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxpar.models.layers import Dropout, ModelConfigError, scaled

VGG16_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = 224, *, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        if image_size < 32:
            raise ModelConfigError(f"VGG16 halves the image five times, so image_size must be at least 32; got {image_size}")
        self.num_classes = num_classes
        self.image_size = image_size
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = scaled(int(item), width)
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        pool = max(1, image_size // 32)
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        hidden = scaled(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(channels * pool * pool, hidden),
            nn.ReLU(),
            Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            Dropout(dropout),
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
