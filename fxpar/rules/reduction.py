"""Rules for reductions and softmax-like ops."""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.registry import AxisStrategy, OpInfo, register_rule

aten = torch.ops.aten


def _norm_dims(dims, ndim: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(d % ndim if ndim else 0 for d in dims)


@register_rule(aten.sum.default, aten.sum.dim_IntList, cost_class="reduction")
def sum_rule(info: OpInfo) -> list[AxisStrategy]:
    x = info.tensor_args[0]
    ndim = x.dim()
    dims = _norm_dims(info.args[1] if len(info.args) > 1 else None, ndim)
    keepdim = bool(info.args[2]) if len(info.args) > 2 else bool(info.kwargs.get("keepdim", False))
    strategies = [AxisStrategy((R,), (R,)), AxisStrategy((P,), (P,))]
    for d in range(ndim):
        if x.shape[d] <= 1:
            continue
        if d in dims:
            strategies.append(AxisStrategy((Shard(d),), (P,)))
        else:
            out_dim = d if keepdim else d - sum(1 for r in dims if r < d)
            strategies.append(AxisStrategy((Shard(d),), (Shard(out_dim),)))
    return strategies


@register_rule(aten._log_softmax.default, aten._softmax.default, cost_class="reduction")
def softmax_rule(info: OpInfo) -> list[AxisStrategy]:
    x = info.tensor_args[0]
    dim = info.args[1] % x.dim()
    out = [AxisStrategy((R,), (R,))]
    out += [AxisStrategy((Shard(d),), (Shard(d),)) for d in range(x.dim()) if d != dim and x.shape[d] > 1]
    return out


@register_rule(aten._log_softmax_backward_data.default, aten._softmax_backward_data.default, cost_class="reduction")
def softmax_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    grad = info.tensor_args[0]
    dim = info.args[2] % grad.dim()
    out = [AxisStrategy((R, R), (R,))]
    out += [AxisStrategy((Shard(d), Shard(d)), (Shard(d),)) for d in range(grad.dim()) if d != dim and grad.shape[d] > 1]
    # Both backwards are linear in the incoming gradient (the forward output is a constant there).
    out.append(AxisStrategy((P, R), (P,)))
    return out
