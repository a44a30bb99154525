"""Rules for batch norm (training mode) and layer norm, forward and backward.

Batch norm in training mode normalizes each channel with the mean and variance over the batch
and spatial dims. Cutting those dims would normalize each shard with its own statistics, which
is a different model (and differently updated running statistics), so the rules here cut only
the channel dim, or replicate: statistics over the batch are always the global statistics.
Layer norm normalizes over its trailing ``normalized_shape`` dims; any leading dim (batch,
sequence) can be cut, the normalized ones cannot.

Both backwards are linear in the incoming gradient (the saved statistics are constants there),
so a Partial gradient passes through to Partial results.
"""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.common import absent_as_r, fill_absent_outputs, present
from fxpar.rules.registry import AxisStrategy, OpInfo, register_rule

aten = torch.ops.aten


@register_rule(aten._native_batch_norm_legit_functional.default, cost_class="reduction")
def batch_norm_rule(info: OpInfo) -> list[AxisStrategy]:
    """(x, weight?, bias?, running_mean, running_var, training, momentum, eps) ->
    (y, save_mean, save_rstd, new_running_mean, new_running_var)."""
    x = info.args[0]
    vectors = info.args[1:5]
    out = [AxisStrategy(present((x, *vectors), (R,) * 5), (R,) * 5)]
    if x.dim() > 1 and x.shape[1] > 1:
        c = Shard(0)
        out.append(AxisStrategy(present((x, *vectors), (Shard(1), c, c, c, c)), (Shard(1), c, c, c, c)))
    return out


@register_rule(aten.native_batch_norm_backward.default, cost_class="reduction")
def batch_norm_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad_y, x, weight?, running_mean?, running_var?, save_mean?, save_invstd?, train, eps, mask)
    -> (grad_x, grad_weight, grad_bias)."""
    absent = fill_absent_outputs(info)
    if not info.args[7]:
        # Eval-mode backward is not part of a training step; it gets only the safe strategy.
        return [AxisStrategy((R,) * len(info.tensor_args), absent_as_r(absent, (R, R, R)))]
    g, x = info.args[0], info.args[1]
    vectors = info.args[2:7]
    rows = [
        ((R, R) + (R,) * 5, (R, R, R)),
        ((P, R) + (R,) * 5, (P, P, P)),
    ]
    if x.dim() > 1 and x.shape[1] > 1:
        rows.append(((Shard(1), Shard(1)) + (Shard(0),) * 5, (Shard(1), Shard(0), Shard(0))))
    return [AxisStrategy(present((g, x, *vectors), ins), absent_as_r(absent, outs)) for ins, outs in rows]


def _leading_dims(x: torch.Tensor, normalized_shape) -> list[int]:
    return [d for d in range(x.dim() - len(normalized_shape)) if x.shape[d] > 1]


@register_rule(aten.native_layer_norm.default, cost_class="reduction")
def layer_norm_rule(info: OpInfo) -> list[AxisStrategy]:
    """(x, normalized_shape, weight?, bias?, eps) -> (y, mean, rstd)."""
    x, shape, w, b = info.args[0], info.args[1], info.args[2], info.args[3]
    out = [AxisStrategy(present((x, w, b), (R, R, R)), (R, R, R))]
    for d in _leading_dims(x, shape):
        out.append(AxisStrategy(present((x, w, b), (Shard(d), R, R)), (Shard(d),) * 3))
    return out


@register_rule(aten.native_layer_norm_backward.default, cost_class="reduction")
def layer_norm_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad_y, x, normalized_shape, mean, rstd, weight?, bias?, mask) -> (grad_x, grad_w, grad_b);
    grad_w and grad_b sum over the leading dims, so a cut there leaves Partial sums."""
    absent = fill_absent_outputs(info)
    g, x, shape, mean, rstd, w, b = info.args[:7]
    args = (g, x, mean, rstd, w, b)
    rows = [((R,) * 6, (R, R, R)), ((P, R, R, R, R, R), (P, P, P))]
    for d in _leading_dims(x, shape):
        s = Shard(d)
        rows.append(((s, s, s, s, R, R), (s, P, P)))
    return [AxisStrategy(present(args, ins), absent_as_r(absent, outs)) for ins, outs in rows]
