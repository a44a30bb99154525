"""The registry of per-op sharding rules.

A rule is written for ONE mesh axis: given an op's arguments (fake tensors standing for the global
values), it lists the ``AxisStrategy``s that are correct on that axis: the placement each tensor
argument must have and the placement each output then has. ``node_strategies`` combines the per-axis
lists into N-D strategies (one choice per axis, every combination), and keeps those whose shards are
even on the mesh. Rules run on global shapes; per-axis composition is sound because an op that is
correct chunk-wise on one axis is correct on each sub-chunk of another.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node
from torch.utils import _pytree as pytree

from fxpar.errors import DuplicateRuleError
from fxpar.placement import P, Partial, Placement, R, Shard, Spec, is_even


@dataclass(frozen=True)
class AxisStrategy:
    inputs: tuple[Placement, ...]  # one per tensor argument, in flattened argument order
    outputs: tuple[Placement, ...]  # one per tensor output


@dataclass(frozen=True)
class OpStrategy:
    """An N-D strategy: a Spec per tensor argument (flattened order) and per output."""

    inputs: tuple[Spec, ...]
    outputs: tuple[Spec, ...]

    def label(self) -> str:
        from fxpar.placement import spec_str

        ins = ",".join(spec_str(s) for s in self.inputs)
        outs = ",".join(spec_str(s) for s in self.outputs)
        return f"{ins}->{outs}" if ins else outs


@dataclass
class OpInfo:
    """What a rule sees: the node, its args with nodes replaced by their fake values, and outputs."""

    node: Node
    args: tuple
    kwargs: dict
    tensor_args: list[torch.Tensor]
    outputs: list[torch.Tensor]

    @property
    def out(self) -> torch.Tensor:
        return self.outputs[0]


Rule = Callable[[OpInfo], list[AxisStrategy]]
# (node, args, kwargs, strategy, mesh_shape, coords) -> (target, args, kwargs): the call the rank at
# mesh coordinates ``coords`` makes, for ops whose arguments carry global sizes (view sizes, factory
# shapes, split sizes, ...) or depend on which shard the rank holds (embedding row offsets).
Localizer = Callable[[Node, list, dict, "OpStrategy", tuple[int, ...], tuple[int, ...]], tuple[Any, list, dict]]
COST_CLASSES = ("matmul", "convolution", "reduction", "elementwise")


@dataclass(frozen=True)
class OpFacts:
    """Everything fxpar knows about one op, from one registration.

    ``rule``: its one-axis strategies (None: no source has any, the op runs replicated);
    ``localize``: rewrites a call's non-tensor arguments for one rank (view sizes, factory shapes);
    ``cost_class``: which efficiencies price it (``fxpar.cost``); ``cheap``: an elementwise op,
    view or slice whose output reshards as cheaply before it as after it, so the simplified
    problem keeps edges between cheap ops unresharded; ``view``: its output aliases an input's
    storage (no memory of its own); ``source``: where the rule comes from, ``"fxpar"`` (this
    package's rules), ``"dtensor"`` (converted from torch's DTensor, ``fxpar.rules.dtensor``)
    or ``"none"``."""

    rule: Rule | None
    localize: Localizer | None = None
    cost_class: str = "elementwise"
    cheap: bool = False
    view: bool = False
    source: str = "fxpar"


_RULES: dict[Any, OpFacts] = {}


def register_rule(
    *targets: Any,
    localize: Localizer | None = None,
    cost_class: str = "elementwise",
    cheap: bool = False,
    view: bool | None = None,
) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the one-axis rule of each target op overload, with the op's facts
    (``OpFacts``); a second rule for an op is an error. ``view`` defaults to torch's own
    ``OpOverload.is_view``. ``localize`` rewrites a call's non-tensor arguments for one rank
    (the rewrite pass applies it after the tensor arguments have been resharded); ops whose
    arguments hold no global sizes need none."""
    assert cost_class in COST_CLASSES, cost_class

    def wrap(fn: Rule) -> Rule:
        for target in targets:
            if target in _RULES:
                raise DuplicateRuleError(
                    f"a sharding rule for {target} is already registered ({_RULES[target].rule.__qualname__})"
                )
            is_view = view if view is not None else bool(getattr(target, "is_view", False))
            _RULES[target] = OpFacts(fn, localize, cost_class, cheap, is_view, "fxpar")
        return fn

    return wrap


def op_facts(target: Any) -> OpFacts:
    """The facts of ``target``: its own registration, else those derived from torch's DTensor
    strategies (``fxpar.rules.dtensor``), else ``rule=None`` with facts from torch's tags."""
    import fxpar.rules  # noqa: F401  (the rule modules register on import)
    from fxpar.rules.dtensor import derived_facts

    facts = _RULES.get(target)
    if facts is not None:
        return facts
    return derived_facts(target)


def get_rule(target: Any) -> Rule | None:
    """The op's rule from any source (None: it runs replicated)."""
    return op_facts(target).rule


def get_localizer(target: Any) -> Localizer | None:
    return op_facts(target).localize


def local_out_shape(node: Node, strategy: "OpStrategy", mesh_shape: tuple[int, ...], index: int = 0) -> list[int]:
    """The per-device shape of the node's output ``index`` under ``strategy``."""
    from fxpar.placement import local_shape

    return list(local_shape(tuple(output_values(node)[index].shape), strategy.outputs[index], mesh_shape))


def registered_ops() -> list[Any]:
    """The ops with a rule of fxpar's own."""
    return list(_RULES)


def tensor_arg_nodes(node: Node) -> list[Node]:
    """The node's tensor arguments in flattened (args, kwargs) order, repeats kept."""
    return [a for a in pytree.arg_tree_leaves(*node.args, **node.kwargs) if isinstance(a, Node)]


def output_values(node: Node) -> list[torch.Tensor]:
    val = node.meta["val"]
    return list(val) if isinstance(val, (tuple, list)) else [val]


def op_info(node: Node) -> OpInfo:
    def value(a):
        return a.meta["val"] if isinstance(a, Node) else a

    args = torch.fx.node.map_arg(node.args, value)
    kwargs = torch.fx.node.map_arg(node.kwargs, value)
    tensors = []
    for j, a in enumerate(tensor_arg_nodes(node)):
        producer, idx = input_source(node, j)
        tensors.append(output_values(producer)[idx])
    return OpInfo(node, args, kwargs, tensors, output_values(node))


def input_source(node: Node, position: int, args: list[Node] | None = None) -> tuple[Node, int]:
    """The producer of tensor argument ``position`` and which of its outputs it reads (``args``:
    the node's ``tensor_arg_nodes``, if already at hand)."""
    arg = (args if args is not None else tensor_arg_nodes(node))[position]
    if node.target is operator.getitem and isinstance(arg.meta.get("val"), (tuple, list)):
        return arg, node.args[1]
    return arg, 0


def combine(per_axis: list[AxisStrategy], info: OpInfo, mesh_shape: tuple[int, ...]) -> list[OpStrategy]:
    """Every choice of one per-axis strategy for each mesh axis whose shards are all even."""
    out: list[OpStrategy] = []
    seen: set[OpStrategy] = set()
    in_shapes = [tuple(t.shape) for t in info.tensor_args]
    out_shapes = [tuple(t.shape) for t in info.outputs]
    for choice in itertools.product(per_axis, repeat=len(mesh_shape)):
        ins = tuple(tuple(c.inputs[i] for c in choice) for i in range(len(in_shapes)))
        outs = tuple(tuple(c.outputs[i] for c in choice) for i in range(len(out_shapes)))
        if not all(is_even(s, p, mesh_shape) for s, p in zip(in_shapes + out_shapes, ins + outs)):
            continue
        strategy = OpStrategy(ins, outs)
        if strategy not in seen:
            seen.add(strategy)
            out.append(strategy)
    return out


def shard_dims(shape: tuple[int, ...]) -> list[Shard]:
    return [Shard(d) for d in range(len(shape)) if shape[d] > 1]


def follow_all(t: torch.Tensor, *, partial: bool = True) -> list[Placement]:
    """Every placement a tensor of ``t``'s shape can have on one axis."""
    return [R, *shard_dims(tuple(t.shape)), *([P] if partial else [])]


__all__ = [
    "AxisStrategy",
    "OpInfo",
    "OpStrategy",
    "Partial",
    "combine",
    "follow_all",
    "get_rule",
    "op_facts",
    "op_info",
    "register_rule",
]
