"""Candidate strategies for every node of a captured graph, from the rule registry."""

from __future__ import annotations

import itertools

from torch.fx import GraphModule, Node

from fxpar.errors import ShardingError, UnsupportedOpError, node_desc
from fxpar.placement import R, Shard, Spec, is_even, spec_str
from fxpar.rules import get_rule
from fxpar.rules.registry import OpStrategy, combine, op_facts, op_info, output_values, tensor_arg_nodes


# How the ranks are given the batch (``fxpar.compile``'s ``input_placement``): "shard" (each rank
# its slice of dim 0, in rank order, as DDP) or "replicate" (every rank the whole batch).
INPUT_PLACEMENTS = ("shard", "replicate")


def graph_input_placement(graph) -> str:
    """The ``input_placement`` a captured graph was recorded with (``gm.meta["fxpar_input_placement"]``,
    which ``fxpar.planner.capture_and_annotate`` writes; "shard" where absent)."""
    owner = graph.owning_module
    return owner.meta.get("fxpar_input_placement", "shard") if owner is not None else "shard"


def graph_batch_norm(graph) -> str:
    """The batch-norm statistics a captured graph is planned for (``gm.meta["fxpar_batch_norm"]``,
    which ``fxpar.planner.capture_and_annotate`` writes; one of
    ``fxpar.runtime.steps.BATCH_NORM_STATS``, "global" where absent)."""
    owner = graph.owning_module
    return owner.meta.get("fxpar_batch_norm", "global") if owner is not None else "global"


def _placeholder_strategies(node: Node, mesh_shape: tuple[int, ...]) -> list[OpStrategy]:
    val = node.meta["val"]
    shape = tuple(val.shape)
    ndim = len(mesh_shape)
    role = node.meta["fxpar_role"]
    if role == "input" and graph_input_placement(node.graph) == "replicate":
        # Every rank brings the whole global batch, as torch's tensor parallelism feeds its ranks.
        return [OpStrategy((), ((R,) * ndim,))]
    if role == "input":
        # Each rank brings its own slice of the global batch, as with DDP: dim 0 is cut over all
        # devices in rank order.
        spec: Spec = (Shard(0),) * ndim
        if not shape or not is_even(shape, spec, mesh_shape):
            world = 1
            for s in mesh_shape:
                world *= s
            size = shape[0] if shape else "a scalar"
            raise ShardingError(
                f"{node.meta['fxpar_fqn']} (%{node.name}, shape {list(shape)}): its batch dim 0 ({size}) "
                f"is not divisible by the {world} devices of mesh {list(mesh_shape)}; use a global batch "
                f"that is a multiple of {world} or a smaller mesh"
            )
        return [OpStrategy((), (spec,))]
    if role == "buffer":
        return [OpStrategy((), ((R,) * ndim,))]
    per_axis = [R] + [Shard(d) for d in range(len(shape)) if shape[d] > 1]
    out = []
    for spec in itertools.product(per_axis, repeat=ndim):
        if is_even(shape, spec, mesh_shape):
            out.append(OpStrategy((), (tuple(spec),)))
    return out


def node_strategies(
    node: Node, mesh_shape: tuple[int, ...], *, strict: bool = False, memo: dict | None = None
) -> list[OpStrategy]:
    """The node's strategies. An op without a rule runs replicated (the inputs are gathered to
    every device), marked ``node.meta["fxpar_fallback"]`` so the planner can warn with its cost;
    with ``strict`` it is an error instead.

    ``memo``: a dict the caller keeps for one pass over one graph (e.g. checking every node of a
    plan). Rules see only an op's shapes and constant arguments, so a node with the signature of
    one seen before in ``memo`` (a copy of a repeated layer) gets the strategies, and the notes in
    ``node.meta``, computed for it. The caller owns its lifetime, so a rule registered or changed
    later is never answered from a stale entry."""
    if node.op == "placeholder":
        return _placeholder_strategies(node, mesh_shape)
    if node.op == "get_attr":
        # A constant tensor the forward creates: every rank holds it whole, as it was traced.
        return [OpStrategy((), ((R,) * len(mesh_shape),))]
    assert node.op == "call_function", node.op
    rule = get_rule(node.target)
    if memo is None:
        return _rule_strategies(node, rule, mesh_shape, strict=strict)
    from fxpar.solve.repeat import node_signature

    flat = tensor_arg_nodes(node)
    key = (node_signature(node), tuple(flat.index(a) for a in flat), tuple(mesh_shape), strict, rule)
    hit = memo.get(key)
    if hit is not None:
        node.meta.update(hit[1])
        return hit[0]
    strategies = _rule_strategies(node, rule, mesh_shape, strict=strict)
    memo[key] = (strategies, {k: node.meta[k] for k in _NOTES if k in node.meta})
    return strategies


# The node.meta notes a rule writes, replayed for a memo hit.
_NOTES = ("fxpar_fallback", "fxpar_fallback_reason", "fxpar_rule_source")


def _rule_strategies(node: Node, rule, mesh_shape: tuple[int, ...], *, strict: bool) -> list[OpStrategy]:
    if rule is None:
        if strict:
            raise UnsupportedOpError(
                f"{node_desc(node)} has no sharding rule; register one with "
                f"@fxpar.rules.register_rule({node.target}) (see CONTRIBUTING.md, 'Adding an op rule'), "
                "or plan with strict=False to run it replicated"
            )
        node.meta["fxpar_fallback"] = True
        node.meta["fxpar_rule_source"] = "none"
        rep = (R,) * len(mesh_shape)
        return [OpStrategy((rep,) * len(tensor_arg_nodes(node)), (rep,) * len(output_values(node)))]
    node.meta["fxpar_rule_source"] = op_facts(node.target).source
    info = op_info(node)
    strategies = combine(rule(info), info, mesh_shape)
    if strict and node.meta.get("fxpar_fallback"):
        raise UnsupportedOpError(f"{node_desc(node)} runs replicated: {node.meta.get('fxpar_fallback_reason')}")
    # Repeated arguments (mul(x, x)) are one tensor: keep strategies that place them alike.
    flat = tensor_arg_nodes(node)
    if len(flat) != len(set(flat)):
        strategies = [
            s for s in strategies if all(s.inputs[i] == s.inputs[flat.index(a)] for i, a in enumerate(flat))
        ]
    assert strategies, f"{node_desc(node)}: no strategy survives on mesh {mesh_shape} (the all-replicate one must)"
    return strategies


def all_strategies(gm: GraphModule, mesh_shape: tuple[int, ...], *, strict: bool = False) -> dict[Node, list[OpStrategy]]:
    # Rules see only an op's shapes and constant arguments: nodes with the same signature (every
    # copy of a repeated layer) share one list.
    from fxpar.solve.repeat import node_signature

    cache: dict[tuple, list[OpStrategy]] = {}
    fallback: dict[tuple, bool] = {}
    out = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            out[n] = node_strategies(n, mesh_shape, strict=strict)
        elif n.op == "call_function":
            key = node_signature(n)
            if key not in cache:
                cache[key] = node_strategies(n, mesh_shape, strict=strict)
                fallback[key] = n.meta.get("fxpar_fallback", False)
            else:
                if fallback[key]:
                    n.meta["fxpar_fallback"] = True
                n.meta["fxpar_rule_source"] = op_facts(n.target).source
                if get_rule(n.target) is None:
                    n.meta["fxpar_fallback"] = True
            out[n] = cache[key]
    return out


def describe(strategy: OpStrategy) -> str:
    return " ".join(spec_str(s) for s in strategy.outputs)
