"""Rules for joining, cutting and indexing ops (cat, stack, split, slice, select, index_select),
``arange``, dropout (``native_dropout`` and the ``bernoulli`` of a functionalized ``dropout``), and the three prims that ``mean``'s decomposition leaves in a graph.

A join or cut along ``dim`` keeps every other dim in place, so those dims can stay sharded and a
Partial sum passes through (these ops are linear); the joined or cut dim itself is never sharded,
since a cut there would not line up with the shard boundaries. Ops whose arguments carry global
sizes (``slice_backward``, ``select_backward``, ``broadcast_in_dim``) or global positions
(``arange``) get per-rank arguments from their ``localize`` hook.

Dropout with ``p > 0`` in training draws a random mask: each device draws the mask of the piece
it holds, so a sharded run does not reproduce a single-device run's masks (the numbers differ,
the distribution is the same). A replicated dropout would let the devices of an axis draw
different masks for what must be one value, so with ``p > 0`` the rule only cuts the tensor.
"""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.common import shard_index, sharding_axes
from fxpar.rules.pointwise import elementwise
from fxpar.rules.registry import AxisStrategy, OpInfo, local_out_shape, register_rule
from fxpar.rules.views import localize_size_arg1

aten = torch.ops.aten
prims = torch.ops.prims


def _kept_dims(x: torch.Tensor, dim: int) -> list[int]:
    return [d for d in range(x.dim()) if d != dim and x.shape[d] > 1]


def _cut_rule(info: OpInfo, x: torch.Tensor, dim: int, out_dim_of=lambda d: d) -> list[AxisStrategy]:
    """One tensor cut (or joined) along ``dim``: the other dims follow, Partial passes."""
    n_in, n_out = len(info.tensor_args), len(info.outputs)
    out = [AxisStrategy((R,) * n_in, (R,) * n_out), AxisStrategy((P,) * n_in, (P,) * n_out)]
    out += [AxisStrategy((Shard(d),) * n_in, (Shard(out_dim_of(d)),) * n_out) for d in _kept_dims(x, dim)]
    return out


@register_rule(aten.cat.default, cheap=True)
def cat_rule(info: OpInfo) -> list[AxisStrategy]:
    tensors = [t for t in info.tensor_args]
    dim = (info.args[1] if len(info.args) > 1 else info.kwargs.get("dim", 0)) % info.out.dim()
    # A legacy 1-D empty tensor (shape (0,)) beside tensors of more dims is skipped by torch.cat
    # (an empty KV cache, as Hugging Face's DynamicCache starts): it holds nothing, so it stays
    # replicated whatever the others do, and does not keep them from being cut.
    legacy = [t.dim() == 1 and t.shape[0] == 0 and info.out.dim() != 1 for t in tensors]
    strategies = [AxisStrategy(tuple(R if skip else p for skip, p in zip(legacy, s.inputs)), s.outputs)
                  for s in _cut_rule(info, info.out, dim)]
    # Every other input must share the kept sizes to be cut.
    return [s for s in strategies if not isinstance(s.outputs[0], Shard) or all(
        skip or (t.dim() == info.out.dim() and t.shape[s.outputs[0].dim] == info.out.shape[s.outputs[0].dim])
        for skip, t in zip(legacy, tensors))]


@register_rule(aten.stack.default, cheap=True)
def stack_rule(info: OpInfo) -> list[AxisStrategy]:
    dim = (info.args[1] if len(info.args) > 1 else info.kwargs.get("dim", 0)) % info.out.dim()
    return _cut_rule(info, info.tensor_args[0], -1, lambda d: d if d < dim else d + 1)


@register_rule(aten.split.Tensor, aten.split_with_sizes.default, cheap=True)
def split_rule(info: OpInfo) -> list[AxisStrategy]:
    x = info.tensor_args[0]
    dim = (info.args[2] if len(info.args) > 2 else info.kwargs.get("dim", 0)) % x.dim()
    return _cut_rule(info, x, dim)


@register_rule(aten.slice.Tensor, cheap=True)
def slice_rule(info: OpInfo) -> list[AxisStrategy]:
    x = info.tensor_args[0]
    dim = (info.args[1] if len(info.args) > 1 else info.kwargs.get("dim", 0)) % x.dim()
    return _cut_rule(info, x, dim)


@register_rule(aten.select.int, cheap=True)
def select_rule(info: OpInfo) -> list[AxisStrategy]:
    x = info.tensor_args[0]
    dim = info.args[1] % x.dim()
    return _cut_rule(info, x, dim, lambda d: d if d < dim else d - 1)


@register_rule(aten.slice_backward.default, localize=localize_size_arg1, cheap=True)
def slice_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad, input_sizes, dim, start, end, step): zeros of the input's size holding grad."""
    dim = info.args[2] % info.out.dim()
    return _cut_rule(info, info.out, dim)


@register_rule(aten.select_backward.default, localize=localize_size_arg1, cheap=True)
def select_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad, input_sizes, dim, index)."""
    dim = info.args[2] % info.out.dim()
    out = [AxisStrategy((R,), (R,)), AxisStrategy((P,), (P,))]
    out += [AxisStrategy((Shard(d if d < dim else d - 1),), (Shard(d),)) for d in _kept_dims(info.out, dim)]
    return out


@register_rule(aten.index_select.default)
def index_select_rule(info: OpInfo) -> list[AxisStrategy]:
    x, index = info.tensor_args
    dim = info.args[1] % x.dim()
    out = [AxisStrategy((R, R), (R,)), AxisStrategy((P, R), (P,))]
    out += [AxisStrategy((Shard(d), R), (Shard(d),)) for d in _kept_dims(x, dim)]
    if index.numel() > 1:
        out.append(AxisStrategy((R, Shard(0)), (Shard(dim),)))
    return out


def arange_shard(start: int, step: int, num_local: int, index: int, **kwargs) -> torch.Tensor:
    """Chunk ``index`` of ``arange(start, start + step * num_local * pieces, step)``."""
    first = start + index * num_local * step
    return torch.arange(first, first + num_local * step, step, **kwargs)


def localize_arange(node, args, kwargs, strategy, mesh_shape, coords):
    axes = sharding_axes(strategy.outputs[0], 0)
    if not axes:
        return node.target, args, kwargs
    start, step = _arange_start_step(node)
    index = shard_index(axes, mesh_shape, coords)
    return arange_shard, [start, step, local_out_shape(node, strategy, mesh_shape)[0], index], kwargs


def _arange_start_step(node) -> tuple:
    if node.target is aten.arange.default:
        return 0, 1
    if node.target is aten.arange.start:
        return node.args[0], 1
    return node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)


@register_rule(aten.arange.default, aten.arange.start, aten.arange.start_step, localize=localize_arange)
def arange_rule(info: OpInfo) -> list[AxisStrategy]:
    out = [AxisStrategy((), (R,))]
    # Integer ranges only: a float range computed in chunks could round differently at the edges.
    if not info.out.dtype.is_floating_point and info.out.shape[0] > 1:
        out.append(AxisStrategy((), (Shard(0),)))
    return out


@register_rule(aten.native_dropout.default, cheap=True)
def native_dropout_rule(info: OpInfo) -> list[AxisStrategy]:
    """(x, p, train) -> (x * mask / (1 - p), mask)."""
    x = info.tensor_args[0]
    p, train = info.args[1], info.args[2] if len(info.args) > 2 else True
    cuts = [AxisStrategy((Shard(d),), (Shard(d), Shard(d))) for d in range(x.dim()) if x.shape[d] > 1]
    if train is not False and p > 0:
        return cuts
    # Without dropping, the op is the identity (and a mask of ones): any layout, Partial included.
    return [AxisStrategy((R,), (R, R)), AxisStrategy((P,), (P, R)), *cuts]


@register_rule(aten.bernoulli.p, cheap=True)
def bernoulli_rule(info: OpInfo) -> list[AxisStrategy]:
    """bernoulli(x, p): a fresh random tensor shaped like ``x`` (functionalized dropout draws its
    mask this way). As with dropout, each device draws the piece it holds, so the op is only cut;
    DTensor's replicated strategies rely on its RNG tracker, which per-rank graphs do not have."""
    x = info.tensor_args[0]
    return [AxisStrategy((Shard(d),), (Shard(d),)) for d in range(x.dim()) if x.shape[d] > 1]


@register_rule(aten.native_dropout_backward.default, cheap=True)
def native_dropout_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad, mask, scale) -> grad * mask * scale: elementwise and linear in grad."""
    return elementwise(info, "first")


@register_rule(prims.sum.default, cost_class="reduction")
def prims_sum_rule(info: OpInfo) -> list[AxisStrategy]:
    """prims.sum(x, dims): a sum over ``dims`` without keepdim."""
    x = info.tensor_args[0]
    dims = sorted(d % x.dim() for d in info.args[1])
    out = [AxisStrategy((R,), (R,)), AxisStrategy((P,), (P,))]
    for d in range(x.dim()):
        if x.shape[d] > 1:
            out.append(AxisStrategy((Shard(d),), (P if d in dims else Shard(d - sum(r < d for r in dims)),)))
    return out


@register_rule(prims.div.default)
def prims_div_rule(info: OpInfo) -> list[AxisStrategy]:
    # Integer prims.div truncates, which does not distribute over a Partial sum.
    return elementwise(info, "first" if info.out.dtype.is_floating_point else None)


@register_rule(prims.broadcast_in_dim.default, localize=localize_size_arg1, cheap=True)
def broadcast_in_dim_rule(info: OpInfo) -> list[AxisStrategy]:
    """broadcast_in_dim(x, shape, broadcast_dimensions): input dim i becomes output dim bd[i]."""
    x = info.tensor_args[0]
    bd = list(info.args[2])
    out = [AxisStrategy((R,), (R,)), AxisStrategy((P,), (P,))]
    for o, size in enumerate(info.out.shape):
        if size <= 1:
            continue
        if o in bd and x.shape[bd.index(o)] == size:
            out.append(AxisStrategy((Shard(bd.index(o)),), (Shard(o),)))
        else:
            out.append(AxisStrategy((R,), (Shard(o),)))  # each device builds only its chunk
    return out
