"""Rules for gather/scatter along a dim (as in decomposed losses) and factory ops."""

from __future__ import annotations

import torch

from fxpar.placement import R, Shard
from fxpar.rules.registry import AxisStrategy, OpInfo, local_out_shape, register_rule

aten = torch.ops.aten


def _same_size_dims(tensors: list[torch.Tensor], skip: int) -> list[int]:
    ndim = tensors[0].dim()
    return [
        d
        for d in range(ndim)
        if d != skip and tensors[0].shape[d] > 1 and all(t.dim() == ndim and t.shape[d] == tensors[0].shape[d] for t in tensors)
    ]


@register_rule(aten.gather.default, aten.scatter.value, aten.scatter.src, aten.scatter_add.default)
def gather_scatter_rule(info: OpInfo) -> list[AxisStrategy]:
    # Every tensor argument and the output index the same positions outside ``dim``, so all can be
    # cut the same way along any other dim.
    tensors = [*info.tensor_args, info.out]
    dim = info.args[1] % info.out.dim()
    n = len(info.tensor_args)
    out = [AxisStrategy((R,) * n, (R,))]
    out += [AxisStrategy((Shard(d),) * n, (Shard(d),)) for d in _same_size_dims(tensors, dim)]
    return out


@register_rule(aten.scalar_tensor.default)
def scalar_tensor_rule(info: OpInfo) -> list[AxisStrategy]:
    return [AxisStrategy((), (R,))]


def localize_size_arg0(node, args, kwargs, strategy, mesh_shape, coords):
    return node.target, [local_out_shape(node, strategy, mesh_shape), *args[1:]], kwargs


@register_rule(aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format, localize=localize_size_arg0)
def full_rule(info: OpInfo) -> list[AxisStrategy]:
    # Each device creates just its chunk; the rewrite gives the op the local size.
    shape = tuple(info.out.shape)
    return [AxisStrategy((), (R,))] + [AxisStrategy((), (Shard(d),)) for d in range(len(shape)) if shape[d] > 1]
