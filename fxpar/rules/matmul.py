"""Rules for matrix products. For C[m,n] = A[m,k] @ B[k,n] on one axis:
shard m (A S(0), C S(0)); shard n (B S(1), C S(1)); shard k (A S(1), B S(0), C Partial);
carry a Partial operand through (the product is linear in each); or replicate."""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.registry import AxisStrategy, OpInfo, register_rule

aten = torch.ops.aten


def _mm(batch: int) -> list[tuple]:
    """(A, B, C) placements for a matmul with ``batch`` leading batch dims."""
    b = batch
    out = [
        (R, R, R),
        (Shard(b), R, Shard(b)),  # m
        (R, Shard(b + 1), Shard(b + 1)),  # n
        (Shard(b + 1), Shard(b), P),  # k
        (P, R, P),
        (R, P, P),
    ]
    if batch:
        out.append((Shard(0), Shard(0), Shard(0)))
    return out


@register_rule(aten.mm.default, cost_class="matmul")
def mm_rule(info: OpInfo) -> list[AxisStrategy]:
    return [AxisStrategy((a, b), (c,)) for a, b, c in _mm(0)]


@register_rule(aten.bmm.default, cost_class="matmul")
def bmm_rule(info: OpInfo) -> list[AxisStrategy]:
    return [AxisStrategy((a, b), (c,)) for a, b, c in _mm(1)]


@register_rule(aten.addmm.default, cost_class="matmul")
def addmm_rule(info: OpInfo) -> list[AxisStrategy]:
    # out = beta * bias + alpha * A @ B; the bias broadcasts against C[m, n].
    bias = info.tensor_args[0]
    out = []
    for a, b, c in _mm(0):
        if isinstance(c, Shard):
            dim = c.dim - (2 - bias.dim())
            bias_p = Shard(dim) if dim >= 0 and bias.shape[dim] == info.out.shape[c.dim] else R
        else:
            bias_p = c  # R with R; a Partial product takes a Partial bias (one device holds it)
        out.append(AxisStrategy((bias_p, a, b), (c,)))
    return out
