"""Rules for 2-D pooling and its backward: max (with indices), average and adaptive average.

A pooling window covers spatial positions of one (sample, channel) plane, so the leading dims
(batch, channels) can be cut and the spatial ones cannot (a window across a shard boundary would
need the neighbour's rows). The max pool's indices are positions within a plane, so they stay
valid on a cut of the leading dims. Average pooling and every backward here are linear in the
pooled tensor (resp. the incoming gradient), so a Partial sum passes through them; the max pool
is not linear and does not take one.
"""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.registry import AxisStrategy, OpInfo, register_rule

aten = torch.ops.aten


def _plane_dims(x: torch.Tensor) -> list[int]:
    """The leading (non-spatial) dims of a 2-D pooling input, ``[N, C, H, W]`` or ``[C, H, W]``."""
    return [d for d in range(x.dim() - 2) if x.shape[d] > 1]


def _rows(x: torch.Tensor, num_in: int, num_out: int, partial: tuple | None) -> list[AxisStrategy]:
    out = [AxisStrategy((R,) * num_in, (R,) * num_out)]
    out += [AxisStrategy((Shard(d),) * num_in, (Shard(d),) * num_out) for d in _plane_dims(x)]
    if partial is not None:
        out.append(AxisStrategy(partial, (P,) * num_out))
    return out


@register_rule(aten.max_pool2d_with_indices.default, cost_class="reduction")
def max_pool_rule(info: OpInfo) -> list[AxisStrategy]:
    return _rows(info.tensor_args[0], 1, 2, None)


@register_rule(aten.max_pool2d_with_indices_backward.default, cost_class="reduction")
def max_pool_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    # (grad_out, x, indices): the gradient is scattered to the argmax positions, linearly.
    return _rows(info.tensor_args[1], 3, 1, (P, R, R))


@register_rule(aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default, cost_class="reduction")
def avg_pool_rule(info: OpInfo) -> list[AxisStrategy]:
    return _rows(info.tensor_args[0], 1, 1, (P,))


@register_rule(aten.avg_pool2d_backward.default, aten._adaptive_avg_pool2d_backward.default, cost_class="reduction")
def avg_pool_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    # (grad_out, x): x only gives the shape of the result.
    return _rows(info.tensor_args[1], 2, 1, (P, R))
