"""Rules for views: reshape, transpose/permute, (un)squeeze, expand. All carry Partial through."""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.registry import AxisStrategy, OpInfo, local_out_shape, register_rule

aten = torch.ops.aten


def localize_size_arg1(node, args, kwargs, strategy, mesh_shape, coords):
    """view/expand take the output size as argument 1: give each rank its local size."""
    return node.target, [args[0], local_out_shape(node, strategy, mesh_shape), *args[2:]], kwargs


def localize_view(node, args, kwargs, strategy, mesh_shape, coords):
    # A rank's input can be laid out differently from the traced one (a collective or a chunk
    # returns it contiguous where the trace had a transposed layout), so a traced view may not
    # apply to it: reshape computes the same values, viewing where it can and copying where not.
    return aten.reshape.default, [args[0], local_out_shape(node, strategy, mesh_shape)], kwargs


def localize_squeeze(node, args, kwargs, strategy, mesh_shape, coords):
    # Sharding can make a dim 1 long locally; squeeze only the dims that are 1 globally.
    dims = [d for d, size in enumerate(node.args[0].meta["val"].shape) if size == 1]
    return aten.squeeze.dims, [args[0], dims], kwargs


def _base(pairs: list[tuple[int, int]]) -> list[AxisStrategy]:
    return [AxisStrategy((R,), (R,)), AxisStrategy((P,), (P,))] + [
        AxisStrategy((Shard(i),), (Shard(o),)) for i, o in pairs
    ]


def reshape_dim_pairs(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(input dim, output dim) pairs that can stay sharded through a reshape: the leading dims of
    groups of dims whose products match, since an even split of a group's leading dim is an even
    split of its flattened memory on both sides."""
    pairs = []
    i = o = 0
    while i < len(in_shape) and o < len(out_shape):
        while i < len(in_shape) and in_shape[i] == 1:
            i += 1
        while o < len(out_shape) and out_shape[o] == 1:
            o += 1
        if i >= len(in_shape) or o >= len(out_shape):
            break
        start_i, start_o = i, o
        pin, pout = in_shape[i], out_shape[o]
        i += 1
        o += 1
        while pin != pout:
            if pin < pout:
                pin *= in_shape[i]
                i += 1
            else:
                pout *= out_shape[o]
                o += 1
        pairs.append((start_i, start_o))
    return pairs


@register_rule(aten.view.default, aten._unsafe_view.default, localize=localize_view, cheap=True, view=True)
def reshape_rule(info: OpInfo) -> list[AxisStrategy]:
    return _base(reshape_dim_pairs(tuple(info.tensor_args[0].shape), tuple(info.out.shape)))


def _permutation_rule(info: OpInfo, perm: list[int]) -> list[AxisStrategy]:
    return _base([(perm[o], o) for o in range(len(perm))])


@register_rule(aten.t.default, cheap=True)
def t_rule(info: OpInfo) -> list[AxisStrategy]:
    return _permutation_rule(info, list(range(info.out.dim()))[::-1])


@register_rule(aten.transpose.int, cheap=True)
def transpose_rule(info: OpInfo) -> list[AxisStrategy]:
    ndim = info.out.dim()
    perm = list(range(ndim))
    d0, d1 = info.args[1] % ndim, info.args[2] % ndim
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permutation_rule(info, perm)


@register_rule(aten.permute.default, cheap=True)
def permute_rule(info: OpInfo) -> list[AxisStrategy]:
    ndim = info.out.dim()
    return _permutation_rule(info, [d % ndim for d in info.args[1]])


@register_rule(aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, cheap=True)
def squeeze_rule(info: OpInfo) -> list[AxisStrategy]:
    return _base(reshape_dim_pairs(tuple(info.tensor_args[0].shape), tuple(info.out.shape)))


register_rule(aten.squeeze.default, localize=localize_squeeze, cheap=True)(squeeze_rule)


@register_rule(aten.expand.default, localize=localize_size_arg1, cheap=True)
def expand_rule(info: OpInfo) -> list[AxisStrategy]:
    in_shape = tuple(info.tensor_args[0].shape)
    out_shape = tuple(info.out.shape)
    offset = len(out_shape) - len(in_shape)
    out = [AxisStrategy((R,), (R,)), AxisStrategy((P,), (P,))]
    for o in range(len(out_shape)):
        i = o - offset
        if i >= 0 and in_shape[i] == out_shape[o]:
            out.append(AxisStrategy((Shard(i),), (Shard(o),)))
        else:
            # Each device materializes only its chunk of the broadcast dim.
            out.append(AxisStrategy((R,), (Shard(o),)))
    return out
