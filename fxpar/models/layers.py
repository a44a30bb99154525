"""Building blocks shared by the shipped models."""

from __future__ import annotations

import torch
from torch import nn

from fxpar.errors import FxparError


class ModelConfigError(FxparError):
    """A shipped model was asked for a configuration it cannot build."""


class Dropout(nn.Module):
    """Dropout through ``aten.native_dropout``, a functional op that returns its mask.

    ``nn.Dropout`` on CPU lowers to an in-place ``bernoulli_`` on a fresh tensor, which a
    functional training step cannot hold; ``native_dropout`` draws the same kind of mask out of
    place. With ``p == 0`` (or in eval mode) it is the identity and adds no op to the graph. A
    sharded step draws each rank's mask on that rank, so with ``p > 0`` a parallel run does not
    reproduce a single-device run's masks."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ModelConfigError(f"dropout probability is {p}; it must be in [0, 1) (0 disables dropout)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.native_dropout(x, self.p, True)[0]

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) written out in elementwise ops and a mean, so
    the captured graph holds primitives whose rules already exist."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def scaled(value: int, width: float) -> int:
    """A channel or hidden size times ``width``, at least 1."""
    if not width > 0:
        raise ModelConfigError(f"width is {width}; it scales channel and hidden sizes and must be positive (1.0 = standard)")
    return max(1, round(value * width))
