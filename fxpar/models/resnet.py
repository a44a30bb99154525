"""ResNet-18 and ResNet-50 (He et al. 2016) with batch norm and residual adds, as in the common
reference definition (the stride of a bottleneck sits on its 3x3 convolution, "v1.5").

At ``image_size >= 64`` the stem is the standard 7x7 stride-2 convolution and 3x3 max-pool;
smaller images (CIFAR-sized) get a 3x3 stride-1 stem without the pool, the usual adaptation.
``width`` scales every channel count (1.0 is the standard model: 64 channels in the first stage).
Batch norm runs in training mode, so a training step also updates the running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxpar.models.layers import scaled


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = _conv_bn(planes, planes * 4, 1)
        self.downsample = _downsample(c_in, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: tuple[int, int, int, int],
                 num_classes: int = 1000, image_size: int = 224, *, width: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        base = scaled(64, width)
        small = image_size < 64
        self.conv1, self.bn1 = _conv_bn(3, base, 3 if small else 7, 1 if small else 2)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        c_in = base
        for i, n in enumerate(num_blocks):
            planes = base * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, planes, 2 if (i > 0 and j == 0) else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return F.cross_entropy(self.fc(x), y)

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images ``[batch, 3, image_size, image_size]`` and labels ``[batch]``."""
        device = next(self.parameters()).device
        x = torch.randn(batch, 3, self.image_size, self.image_size, device=device)
        return x, torch.randint(0, self.num_classes, (batch,), device=device)


class ResNet18(ResNet):
    def __init__(self, num_classes: int = 1000, image_size: int = 224, *, width: float = 1.0):
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, image_size, width=width)


class ResNet50(ResNet):
    def __init__(self, num_classes: int = 1000, image_size: int = 224, *, width: float = 1.0):
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, image_size, width=width)
