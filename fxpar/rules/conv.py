"""Rules for convolution and its backward.

For ``y = conv(x, w) + b`` with x ``[N, C_in, *spatial]``, w ``[C_out, C_in/groups, *kernel]``,
y ``[N, C_out, *spatial']``, on one mesh axis:

| strategy | x | w | b | y |
|---|---|---|---|---|
| batch (data parallel) | S(0) | R | R | S(0) |
| output channels | R | S(0) | S(0) | S(1) |
| input channels (the reduction) | S(1) | S(1) | P | P |
| carry a Partial operand | P / R | R / P | P | P |

Spatial dims are never cut: a window that crosses a shard boundary would need the neighbour's
rows (a halo exchange). Channels are cut only for ungrouped, non-transposed convolutions; grouped
and transposed ones keep the batch and Partial strategies.
"""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.common import absent_as_r, fill_absent_outputs, present
from fxpar.rules.registry import AxisStrategy, OpInfo, local_out_shape, register_rule

aten = torch.ops.aten


def _channels_cuttable(info: OpInfo, transposed_pos: int, groups_pos: int) -> bool:
    return not info.args[transposed_pos] and info.args[groups_pos] == 1


@register_rule(aten.convolution.default, cost_class="convolution")
def convolution_rule(info: OpInfo) -> list[AxisStrategy]:
    x, w, b = info.args[0], info.args[1], info.args[2]
    rows = [
        ((R, R, R), R),
        ((P, R, P), P),  # linear in the input: a Partial bias adds it once in total
        ((R, P, P), P),
    ]
    if x.shape[0] > 1:
        rows.append(((Shard(0), R, R), Shard(0)))
    if _channels_cuttable(info, 6, 8):
        if w.shape[0] > 1:
            rows.append(((R, Shard(0), Shard(0)), Shard(1)))
        if w.shape[1] > 1:
            rows.append(((Shard(1), Shard(1), P), P))
    return [AxisStrategy(present((x, w, b), ins), (out,)) for ins, out in rows]


def localize_conv_backward(node, args, kwargs, strategy, mesh_shape, coords):
    # bias_sizes is the global size of the bias gradient; a rank computes only its shard of it.
    if args[3] is not None and node.args[10][2]:
        args = [*args[:3], local_out_shape(node, strategy, mesh_shape, 2), *args[4:]]
    return node.target, args, kwargs


@register_rule(aten.convolution_backward.default, localize=localize_conv_backward, cost_class="convolution")
def convolution_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad_out, x, w) -> (grad_x, grad_w, grad_b). Each output is a product of grad_out with x or
    w, so it is linear in grad_out; grad_b is grad_out summed over every dim but the channels."""
    absent = fill_absent_outputs(info)
    g, x, w = info.tensor_args
    rows = [
        ((R, R, R), (R, R, R)),
        ((P, R, R), (P, P, P)),
    ]
    if x.shape[0] > 1:
        rows.append(((Shard(0), Shard(0), R), (Shard(0), P, P)))
    if _channels_cuttable(info, 7, 9):
        if w.shape[0] > 1:
            rows.append(((Shard(1), R, Shard(0)), (P, Shard(0), Shard(0))))
        if w.shape[1] > 1:
            rows.append(((R, Shard(1), Shard(1)), (Shard(1), Shard(1), R)))
    return [AxisStrategy(ins, absent_as_r(absent, outs)) for ins, outs in rows]
