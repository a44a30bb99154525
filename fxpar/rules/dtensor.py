"""Strategies for ops fxpar has no rule of its own for, converted from torch's DTensor.

torch's DTensor registers sharding strategies for about a thousand aten ops
(``torch.distributed.tensor._ops``): "single-dim" strategies, written for one mesh axis as fxpar's
rules are, and full op strategies, which enumerate strategies over a given mesh. This module is the
one place that reads those private registries (torch is pinned, which contains the risk), and turns
them into fxpar ``AxisStrategy`` lists:

- single-dim strategies are called with the op's arguments as DTensor ``TensorMeta``; each returned
  rule is ``[outputs..., inputs...]`` and a ``_ShardingPlaceholder(d)`` becomes ``Shard(d)``;
- full op strategies are called on a 1-D mesh of two devices (built without a process group),
  each input offered every placement (``R``, each ``Shard(d)``, ``P``); every ``OpSpec`` the
  strategy returns is one axis strategy;
- ``Partial("sum")`` becomes ``P``; placements fxpar does not model (``_StridedShard``, Partial
  avg/max/min, the masked partial of a sharded embedding) drop the strategy that holds them, never
  approximated; the all-replicate strategy is always present, as DTensor assumes.

Not converted, so the op runs replicated with a ``FallbackWarning``: ops torch tags
``nondeterministic_seeded`` (DTensor keeps their replicas equal with its own RNG tracker, which
fxpar's per-rank graphs do not have: fxpar's own rules cut them instead), ops DTensor runs through a
custom handler rather than its strategies, and ops whose tensor arguments DTensor counts
differently from fxpar (tensors in keyword arguments). For the ops whose size arguments DTensor
rewrites per rank (``op_to_shape_and_stride_idx``: ``new_zeros``, ``new_empty_strided``, ...), the
derived ``localize`` hook puts the rank's local output shape there, as DTensor's dispatcher does.

Facts (``OpFacts``) come from torch's tags: ``pointwise`` ops and views are cheap; the cost class is
``reduction`` for ops tagged ``reduction``, ``convolution`` or ``matmul`` for ops
``torch.utils.flop_counter`` counts FLOPs of (by whether the name says convolution), else
``elementwise``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import flop_registry

from fxpar.placement import P, Placement, R, Shard
from fxpar.rules.registry import AxisStrategy, OpFacts, OpInfo, local_out_shape

aten = torch.ops.aten
_MESH_SIZE = 2  # the 1-D mesh full op strategies are enumerated on


def _propagator():
    from torch.distributed.tensor import DTensor

    return DTensor._op_dispatcher.sharding_propagator


def _custom_handlers() -> dict:
    from torch.distributed.tensor import DTensor

    return getattr(DTensor._op_dispatcher, "_custom_op_handlers", {})


def dtensor_has(target: Any) -> bool:
    """Whether torch's DTensor registers strategies for ``target`` that fxpar can convert."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or target in _custom_handlers():
        return False
    prop = _propagator()
    return target in prop.op_single_dim_strategy_funcs or target in prop.op_strategy_funcs


def _cost_class(target: Any) -> str:
    if not isinstance(target, torch._ops.OpOverload):
        return "elementwise"
    if torch.Tag.reduction in target.tags:
        return "reduction"
    if target.overloadpacket in flop_registry:
        return "convolution" if "conv" in target.overloadpacket.__name__ else "matmul"
    return "elementwise"


@functools.lru_cache(maxsize=None)
def derived_facts(target: Any) -> OpFacts:
    """``OpFacts`` for an op without a rule of fxpar's own: DTensor-derived where torch has
    strategies for it, else ``rule=None`` (the op runs replicated)."""
    is_view = bool(getattr(target, "is_view", False))
    pointwise = isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
    if not dtensor_has(target):
        return OpFacts(None, None, _cost_class(target), False, is_view, "none")
    localize = _localize_size if target in _propagator().op_to_shape_and_stride_idx else None
    return OpFacts(dtensor_rule, localize, _cost_class(target), pointwise or is_view, is_view, "dtensor")


def _convert(p) -> Placement | None:
    """fxpar's placement for a DTensor one, or None where fxpar does not model it."""
    from torch.distributed.tensor import Partial as DPartial
    from torch.distributed.tensor import Replicate as DReplicate
    from torch.distributed.tensor import Shard as DShard
    from torch.distributed.tensor._ops.single_dim_strategy import _ShardingPlaceholder

    if p is None:
        return R  # an output the op does not compute
    if isinstance(p, _ShardingPlaceholder):
        return Shard(p.dim)
    if type(p) is DShard:
        return Shard(p.dim)
    if type(p) is DReplicate:
        return R
    if type(p) is DPartial and p.reduce_op == "sum":
        return P
    return None


def _meta(t: torch.Tensor):
    from torch.distributed.tensor._dtensor_spec import TensorMeta

    return TensorMeta(t.shape, t.stride(), t.dtype)


def _tensor_positions(info: OpInfo) -> bool:
    """DTensor counts the tensors of positional arguments (and lists of them); fxpar counts
    tensors in keyword arguments too. Convert only where the two agree."""
    return not any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(info.kwargs))


def _from_single_dim(info: OpInfo, fn) -> list[list]:
    args = pytree.tree_map_only(torch.Tensor, _meta, info.args)
    kwargs = pytree.tree_map_only(torch.Tensor, _meta, info.kwargs)
    return [list(rule) for rule in fn(info.node.target, args, kwargs)]


@functools.lru_cache(maxsize=1)
def _mesh():
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", torch.arange(_MESH_SIZE), _init_backend=False, _rank=0)


def _from_op_strategy(info: OpInfo, fn) -> list[list]:
    from torch.distributed.tensor import Partial as DPartial
    from torch.distributed.tensor import Replicate as DReplicate
    from torch.distributed.tensor import Shard as DShard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy

    mesh = _mesh()

    def offer(t: torch.Tensor):
        placements = [DReplicate(), *[DShard(d) for d in range(t.dim())], DPartial()]
        return OpStrategy([OpSpec(DTensorSpec(mesh, (p,), _meta(t))) for p in placements])

    args = pytree.tree_map_only(torch.Tensor, offer, info.args)
    kwargs = pytree.tree_map_only(torch.Tensor, offer, info.kwargs)
    result = fn(OpSchema(info.node.target, args, kwargs))
    if not isinstance(result, OpStrategy):
        return []
    rules = []
    for spec in result.strategies:
        outs = spec.output_specs if isinstance(spec.output_specs, (tuple, list)) else (spec.output_specs,)
        if spec.input_specs is None:
            continue
        rules.append([o.placements[0] if o is not None else None for o in outs] + [i.placements[0] for i in spec.input_specs])
    return rules


def dtensor_rule(info: OpInfo) -> list[AxisStrategy]:
    """The op's one-axis strategies, converted from DTensor's (see the module docstring)."""
    target = info.node.target
    num_in, num_out = len(info.tensor_args), len(info.outputs)
    strategies = [AxisStrategy((R,) * num_in, (R,) * num_out)]
    if not _tensor_positions(info):
        return strategies
    prop = _propagator()
    single = prop.op_single_dim_strategy_funcs.get(target)
    try:
        rules = _from_single_dim(info, single) if single is not None else _from_op_strategy(info, prop.op_strategy_funcs[target])
    except Exception as exc:  # noqa: BLE001  (a private registry's strategy refusing these arguments)
        # DTensor's strategy does not accept these arguments: the op runs replicated, and the
        # planner says so (FallbackWarning), as for an op without any rule.
        info.node.meta["fxpar_fallback"] = True
        info.node.meta["fxpar_fallback_reason"] = f"DTensor's strategy raised {type(exc).__name__}: {exc}"
        return strategies
    for rule in rules:
        if len(rule) != num_out + num_in:
            continue
        converted = [_convert(p) for p in rule]
        if any(p is None for p in converted):
            continue
        # A shard of a size-1 dim, or of a dim the tensor does not have, is no layout.
        values = list(info.outputs) + list(info.tensor_args)
        if any(isinstance(p, Shard) and (v is None or not 0 <= p.dim < v.dim() or v.shape[p.dim] <= 1)
               for p, v in zip(converted, values)):
            continue
        strategy = AxisStrategy(tuple(converted[num_out:]), tuple(converted[:num_out]))
        if strategy not in strategies:
            strategies.append(strategy)
    return strategies


def _localize_size(node, args: list, kwargs: dict, strategy, mesh_shape: tuple[int, ...], coords: tuple[int, ...]):
    """The rank's call of an op whose size (and stride) argument DTensor rewrites per rank."""
    index = _propagator().op_to_shape_and_stride_idx[node.target]
    size_index, stride_index = index if isinstance(index, tuple) else (index, None)
    shape = local_out_shape(node, strategy, mesh_shape)
    args = list(args)
    args[size_index] = shape
    if stride_index is not None:
        stride, acc = [], 1
        for size in reversed(shape):
            stride.insert(0, acc)
            acc *= max(size, 1)
        args[stride_index] = stride
    return node.target, args, kwargs
