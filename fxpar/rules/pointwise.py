"""Rules for elementwise ops (with broadcasting) and the linear ones that carry Partial sums."""

from __future__ import annotations

import operator

import torch

from fxpar.placement import P, Placement, R, Shard
from fxpar.rules.registry import AxisStrategy, OpInfo, follow_all, register_rule

aten = torch.ops.aten


def _aligned(shape: tuple[int, ...], out_shape: tuple[int, ...], out_dim: int) -> Placement:
    """The placement an argument needs for the output to be sharded on ``out_dim``: its own matching
    dim sharded, or replicated where it broadcasts along that dim."""
    dim = out_dim - (len(out_shape) - len(shape))
    if dim >= 0 and shape[dim] == out_shape[out_dim]:
        return Shard(dim)
    return R


def elementwise(info: OpInfo, linear: str | None = None) -> list[AxisStrategy]:
    """``linear``: None (no Partial), ``"all"`` (every tensor argument Partial: add/sub), ``"one"``
    (any one tensor argument Partial, the rest replicated: mul), ``"first"`` (only argument 0: div)."""
    out_shape = tuple(info.out.shape)
    shapes = [tuple(t.shape) for t in info.tensor_args]
    n = len(shapes)
    strategies = [AxisStrategy((R,) * n, (R,) * len(info.outputs))]
    for d in range(len(out_shape)):
        if out_shape[d] > 1:
            strategies.append(AxisStrategy(tuple(_aligned(s, out_shape, d) for s in shapes), (Shard(d),) * len(info.outputs)))
    if linear == "all" and n:
        strategies.append(AxisStrategy((P,) * n, (P,)))
    elif linear in ("one", "first"):
        for i in range(n if linear == "one" else min(n, 1)):
            strategies.append(AxisStrategy(tuple(P if j == i else R for j in range(n)), (P,)))
    return strategies


_NONLINEAR = [
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.abs.default,
    aten.reciprocal.default, aten.sign.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.where.self, aten.ne.Scalar, aten.ne.Tensor, aten.eq.Scalar, aten.eq.Tensor, aten.le.Scalar,
    aten.le.Tensor, aten.lt.Scalar, aten.lt.Tensor, aten.ge.Scalar, aten.ge.Tensor, aten.gt.Scalar,
    aten.gt.Tensor, aten.maximum.default, aten.minimum.default, aten.clamp.default, aten.clamp_min.default,
    aten.logical_not.default, aten.logical_and.default, aten.logical_or.default, aten.masked_fill.Scalar,
    aten.gelu_backward.default, aten.silu_backward.default, aten.sigmoid_backward.default,
    aten.tanh_backward.default,
    aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar,
    # copy(self, src) is src in self's shape and dtype; fill(self, value) is value in self's shape.
    # DTensor has no strategies for these (it handles them outside its strategy registry).
    aten.copy.default, aten.fill.Tensor, aten.fill.Scalar,
]


@register_rule(*_NONLINEAR, cheap=True)
def nonlinear_rule(info: OpInfo) -> list[AxisStrategy]:
    return elementwise(info)


@register_rule(aten.neg.default, aten.clone.default, aten._to_copy.default, cheap=True)
def unary_linear_rule(info: OpInfo) -> list[AxisStrategy]:
    return elementwise(info, "first")


@register_rule(aten.ones_like.default, aten.full_like.default, aten.empty_like.default, aten.zeros_like.default,
               cheap=True)
def like_rule(info: OpInfo) -> list[AxisStrategy]:
    """A tensor of the input's shape whose values do not depend on the input's: a Partial input
    (each device's piece has the whole shape) gives a replicated output without communication,
    as the backward's ``ones_like(loss)`` of a loss left as a Partial sum does. Zeros are also a
    Partial sum of zeros."""
    strategies = elementwise(info, "first" if info.node.target is aten.zeros_like.default else None)
    return strategies + [AxisStrategy((P,), (R,))]


@register_rule(aten.add.Tensor, aten.sub.Tensor, cheap=True)
def add_rule(info: OpInfo) -> list[AxisStrategy]:
    # A Partial sum plus a constant would add the constant once per device: Partial only when both
    # operands are tensors.
    both_tensors = len(info.tensor_args) == 2
    return elementwise(info, "all" if both_tensors else None)


@register_rule(aten.mul.Tensor, aten.mul.Scalar, cheap=True)
def mul_rule(info: OpInfo) -> list[AxisStrategy]:
    return elementwise(info, "one")


@register_rule(aten.div.Tensor, aten.div.Scalar, aten.threshold_backward.default, cheap=True)
def div_rule(info: OpInfo) -> list[AxisStrategy]:
    return elementwise(info, "first")


@register_rule(operator.getitem, cheap=True)
def getitem_rule(info: OpInfo) -> list[AxisStrategy]:
    return [AxisStrategy((p,), (p,)) for p in follow_all(info.out)]
