"""Rewrite pass: turn the global joint graph into the graph one rank runs under a plan.

Reads ``node.meta["val"]`` and the chosen ``OpStrategy`` of every node. Writes a new GraphModule
whose placeholders are the rank's local parameter shards and local batch slices, and whose output
is ``(loss replicated, *grads in their parameter's spec, *updated buffers replicated)``. Where a producer's spec differs from what
a consumer wants, the steps of ``fxpar.reshard.reshard_steps`` are inserted as calls to
``fxpar.runtime.collectives``; ops whose rule registered a ``localize`` hook (view/expand/factory
sizes, ...) get their per-device arguments from it; factory ops get the run's device.

Before (global, mm chosen row-parallel on a 1-D mesh of 2: x S(1), w S(0) -> Partial)::

    %mm = aten.mm(%x, %w)              # x[8,16], w[16,4]
    %relu = aten.relu(%mm)             # wants Replicate

After::

    %mm = aten.mm(%x, %w)              # x[8,8], w[8,4] locally
    %all_reduce = collectives.all_reduce(%mm, 0)
    %relu = aten.relu(%all_reduce)
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from fxpar.passes.capture import step_outputs
from fxpar.placement import Spec, replicated
from fxpar.reshard import reshard_steps
from fxpar.rules.registry import OpStrategy, get_localizer, input_source
from fxpar.runtime.collectives import ASYNC_STEPS, STEP_OPS, wait



def rewrite(
    gm: GraphModule,
    assignment: dict[Node, OpStrategy],
    mesh_shape: tuple[int, ...],
    *,
    device: torch.device | None = None,
    output_specs: list[Spec] | None = None,
) -> GraphModule:
    """``output_specs``: the spec of each graph output; by default a training step's (the loss
    replicated, each gradient in its parameter's spec)."""
    graph = Graph()
    env: dict[Node, Node] = {}
    cache: dict[tuple[Node, int, Spec], Node] = {}

    def get(u: Node, idx: int, dst: Spec) -> Node:
        key = (u, idx, dst)
        if key in cache:
            return cache[key]
        src = assignment[u].outputs[idx]
        if src == dst:
            if isinstance(u.meta.get("val"), (tuple, list)):
                node = graph.call_function(operator.getitem, (env[u], idx))
            else:
                node = env[u]
        else:
            node = get(u, idx, src)
            for step in reshard_steps(src, dst):
                args = [node, step.axis] + ([step.dim] if step.dim >= 0 else []) + ([step.dim2] if step.dim2 >= 0 else [])
                node = graph.call_function(STEP_OPS[step.kind], tuple(args))
        cache[key] = node
        return node

    output = gm.graph.output_node()
    out_nodes = list(output.args[0])
    if output_specs is None:
        _, grads, buffers = step_outputs(gm)
        rep = replicated(len(mesh_shape))
        output_specs = [rep] + [assignment[p].outputs[0] for _, p in grads] + [rep] * len(buffers)
    assert len(output_specs) == len(out_nodes)
    wanted: dict[Node, list[Spec]] = {}
    for out, spec in zip(out_nodes, output_specs):
        wanted.setdefault(out, []).append(spec)
    # Gradients resharded by one all-reduce or reduce-scatter are synchronized asynchronously:
    # started where the gradient is produced, waited for at the end of the step.
    is_grad = {grad for grad, _ in step_outputs(gm)[1]} if "fxpar_outputs" in gm.meta else set()
    pending: dict[tuple[Node, Spec], Node] = {}

    def start_async(u: Node, dst: Spec) -> bool:
        if u not in is_grad or isinstance(u.meta.get("val"), (tuple, list)):
            return False
        steps = reshard_steps(assignment[u].outputs[0], dst)
        if len(steps) != 1 or steps[0].kind not in ASYNC_STEPS:
            return False
        step = steps[0]
        args = (env[u], step.axis) + ((step.dim,) if step.dim >= 0 else ())
        pending[(u, dst)] = graph.call_function(ASYNC_STEPS[step.kind], args)
        return True

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":  # a constant the forward creates: replicated on every rank
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_function":
            strategy = assignment[node]
            if node.target is operator.getitem and isinstance(node.args[0].meta.get("val"), (tuple, list)):
                u, idx = input_source(node, 0)
                env[node] = get(u, idx, strategy.inputs[0])
            else:
                leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
                arg_nodes = [leaf for leaf in leaves if isinstance(leaf, Node)]
                j = 0
                for i, leaf in enumerate(leaves):
                    if isinstance(leaf, Node):
                        u, idx = input_source(node, j, arg_nodes)
                        leaves[i] = get(u, idx, strategy.inputs[j])
                        j += 1
                args, kwargs = pytree.tree_unflatten(leaves, spec)
                args = list(args)
                target = node.target
                localize = get_localizer(target)
                if localize is not None:
                    target, args, kwargs = localize(node, args, dict(kwargs), strategy, mesh_shape)
                if device is not None and "device" in kwargs:
                    kwargs = {**kwargs, "device": device}
                env[node] = graph.call_function(target, tuple(args), kwargs)
        elif node.op == "output":
            continue
        else:
            raise AssertionError(f"unexpected node {node.op} {node.name}")
        for dst in wanted.get(node, []):
            if (node, dst) not in pending and not start_async(node, dst):
                get(node, 0, dst)
    waited = {key: graph.call_function(wait, (handle,)) for key, handle in pending.items()}
    graph.output(tuple(waited.get((out, spec)) or get(out, 0, spec) for out, spec in zip(out_nodes, output_specs)))
    new = GraphModule(gm, graph)
    new.meta.update(gm.meta)
    if device is not None:
        for node in graph.nodes:
            if node.op == "get_attr":
                setattr(new, node.target, getattr(new, node.target).to(device))
    return new
