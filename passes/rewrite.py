"""Rewrite pass: turn the global joint graph into the graph one rank runs under a plan.

Reads ``node.meta["val"]`` (global shapes) and the chosen ``OpStrategy`` of every node, and writes a
new GraphModule for the rank at given mesh coordinates: the rank's ops on its local shapes, and
between a producer and a consumer that disagree on a tensor's spec, the steps of
``fxpar.reshard.reshard_steps`` emitted by ``fxpar.runtime.steps.apply_steps`` as torch functional
collectives (``torch.ops._c10d_functional.*`` and ``wait_tensor``, addressed by the mesh axes'
process-group names) and aten ops. Everything rank-dependent is resolved here from the rank's
coordinates: a ``chunk`` is an ``aten.slice`` at this rank's offset, ``keep_one`` a multiplication
by 1 or 0, and ops whose rule registered a ``localize`` hook (view/expand/factory sizes,
vocabulary-parallel embedding offsets, ``arange`` starts) get this rank's arguments from it; so the
graph reads no process-global state and any torch backend can run it. Factory ops get the run's
device. The placeholders are the rank's local pieces (parameter shards, buffers, its slice of the
batch), under the global graph's names; the output is ``(loss replicated, *grads in their
parameter's spec, *updated buffers replicated)``. Gradients synchronized by one all-reduce or
reduce-scatter are issued where they are produced and waited for at the end of the graph; a
resharded value is made once per (producer, output, spec) and shared by its consumers. The
collectives of values made from the batch alone are then issued at the start of the step
(``fxpar.passes.schedule``).

``batch_norm``: how a batch norm whose batch is cut computes its statistics
(``fxpar.runtime.steps.BATCH_NORM_STATS``): ``"global"`` (the default; the whole batch's, as a
single device computes them) or ``"local"`` (each device's own slice, DDP's semantics; see
``fxpar.rules.norm``).

Writes no ``node.meta`` keys; ``gm.meta`` is copied to the new graph.

Before (global, mm chosen row-parallel on a 1-D mesh of 2: x S(1), w S(0) -> Partial)::

    %mm = aten.mm(%x, %w)              # x[8,16], w[16,4]
    %relu = aten.relu(%mm)             # wants Replicate

After (rank 0)::

    %mm = aten.mm(%x, %w)              # x[8,8], w[8,4] locally
    %all_reduce = _c10d_functional.all_reduce(%mm, "sum", "<axis 0 group>")
    %wait_tensor = _c10d_functional.wait_tensor(%all_reduce)
    %relu = aten.relu(%wait_tensor)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from fxpar.passes.capture import step_outputs
from fxpar.passes.schedule import move_batch_collectives
from fxpar.placement import Spec, local_shape, replicated
from fxpar.reshard import reshard_steps
from fxpar.rules.registry import OpStrategy, get_localizer, input_source, output_values, tensor_arg_nodes
from fxpar.errors import PlanOptionError
from fxpar.runtime.steps import ASYNC_KINDS, BATCH_NORM_STATS, RankCoords, RankMesh, apply_steps, start_step

__all__ = ["rewrite", "rewrite_graph"]


def _is_multi(node: Node) -> bool:
    return isinstance(node.meta.get("val"), (tuple, list))


def rewrite(
    gm: GraphModule,
    assignment: dict[Node, OpStrategy],
    mesh_shape: Sequence[int],
    *,
    coords: Sequence[int] | None = None,
    group_names: Sequence[str] | None = None,
    device: torch.device | None = None,
    output_specs: list[Spec] | None = None,
    batch_norm: str = "global",
) -> GraphModule:
    """The graph of the rank at ``coords`` (default: the first rank) whose mesh axes' process
    groups are named ``group_names`` (default: stand-in names, enough to inspect the graph but not
    to run its collectives). ``output_specs``: the spec of each graph output; by default a training
    step's (the loss replicated, each gradient in its parameter's spec, buffers replicated).
    ``batch_norm``: ``"global"`` or ``"local"`` statistics for a batch norm over a cut batch."""
    graph = _rank_graph(gm, assignment, mesh_shape, coords, group_names, device, output_specs, batch_norm)
    new = GraphModule(gm, graph)
    new.meta.update(gm.meta)
    if device is not None:
        for node in graph.nodes:
            if node.op == "get_attr":
                setattr(new, node.target, getattr(new, node.target).to(device))
    return new


def rewrite_graph(gm: GraphModule, assignment: dict[Node, OpStrategy], mesh_shape: Sequence[int], **options) -> Graph:
    """``rewrite``'s graph (``options``: ``rewrite``'s keywords) before it becomes a
    ``GraphModule``, so no Python code is generated for it: for an interpreter that runs it once,
    such as the simulator. Its ``get_attr`` nodes name ``gm``'s attributes (not moved to a device)."""
    return _rank_graph(gm, assignment, mesh_shape, **options)


def _rank_graph(gm, assignment, mesh_shape, coords=None, group_names=None, device=None, output_specs=None,
                batch_norm="global") -> Graph:
    if batch_norm not in BATCH_NORM_STATS:
        raise PlanOptionError(f"batch_norm={batch_norm!r} is not one of {list(BATCH_NORM_STATS)}: 'global' (the whole "
                              "batch's statistics, as on one device) or 'local' (each device's own, as DDP)")
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if group_names is None:
        mesh = RankMesh.placeholder(mesh_shape, coords)
    else:
        mesh = RankMesh(mesh_shape, tuple(coords) if coords is not None else (0,) * len(mesh_shape), tuple(group_names))
    if batch_norm == "local":
        from fxpar.rules.norm import local_stats_assignment

        assignment = local_stats_assignment(assignment)
    graph = Graph()
    emit = lambda target, *args: graph.call_function(target, args)  # noqa: E731
    env: dict[Node, Node] = {}
    cache: dict[tuple[Node, int, Spec], Node] = {}

    def get(u: Node, idx: int, dst: Spec) -> Node:
        key = (u, idx, dst)
        if key not in cache:
            src = assignment[u].outputs[idx]
            if src == dst:
                cache[key] = graph.call_function(operator.getitem, (env[u], idx)) if _is_multi(u) else env[u]
            else:
                shape = local_shape(tuple(output_values(u)[idx].shape), src, mesh_shape)
                cache[key] = apply_steps(get(u, idx, src), reshard_steps(src, dst), mesh, shape, emit)
        return cache[key]

    out_nodes = list(gm.graph.output_node().args[0])
    if output_specs is None:
        _, grads, buffers = step_outputs(gm)
        rep = replicated(len(mesh_shape))
        output_specs = [rep] + [assignment[p].outputs[0] for _, p in grads] + [rep] * len(buffers)
    assert len(output_specs) == len(out_nodes)
    wanted: dict[Node, list[Spec]] = {}
    for out, spec in zip(out_nodes, output_specs):
        wanted.setdefault(out, []).append(spec)
    is_grad = {grad for grad, _ in step_outputs(gm)[1]} if "fxpar_outputs" in gm.meta else set()
    # Gradient syncs in flight: (node, spec) -> (issued value, finish).
    pending: dict[tuple[Node, Spec], tuple] = {}
    late: list[tuple[Node, Spec]] = []

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":  # a constant the step creates: the same on every rank
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_function":
            env[node] = _call(graph, node, assignment[node], get, mesh, device, batch_norm)
        elif node.op == "output":
            continue
        else:
            raise AssertionError(f"unexpected node {node.op} {node.name}")
        for dst in wanted.get(node, []):
            steps = reshard_steps(assignment[node].outputs[0], dst)
            single = not _is_multi(node) and len(steps) == 1 and steps[0].kind in ASYNC_KINDS
            if node in is_grad and single:
                shape = local_shape(tuple(node.meta["val"].shape), assignment[node].outputs[0], mesh_shape)
                pending.setdefault((node, dst), start_step(env[node], shape, steps[0], mesh, emit))
            elif single and not _read_as(node, dst, assignment):
                # An output no op reads in its output spec (a Partial loss, a buffer's new value
                # summed over devices): issued after the gradients, so that it joins their bucket.
                late.append((node, dst))
            else:
                get(node, 0, dst)
    for node, dst in late:
        steps = reshard_steps(assignment[node].outputs[0], dst)
        shape = local_shape(tuple(node.meta["val"].shape), assignment[node].outputs[0], mesh_shape)
        pending.setdefault((node, dst), start_step(env[node], shape, steps[0], mesh, emit))
    finished = {key: finish(value) for key, (value, finish) in pending.items()}
    graph.output(tuple(finished[(out, spec)] if (out, spec) in finished else get(out, 0, spec)
                       for out, spec in zip(out_nodes, output_specs)))
    move_batch_collectives(graph, {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("fxpar_role") == "input"})
    return graph


def _read_as(node: Node, spec: Spec, assignment: dict[Node, OpStrategy]) -> bool:
    """Whether an op of the graph reads ``node``'s output in ``spec``."""
    for user in node.users:
        if user.op != "call_function":
            continue
        args = tensor_arg_nodes(user)
        for j in range(len(args)):
            if input_source(user, j, args) == (node, 0) and assignment[user].inputs[j] == spec:
                return True
    return False


def _call(graph: Graph, node: Node, strategy: OpStrategy, get, mesh: RankMesh, device: torch.device | None,
          batch_norm: str = "global") -> Node:
    """The node's call on this rank's local values."""
    if node.target is operator.getitem and _is_multi(node.args[0]):
        u, idx = input_source(node, 0)
        return get(u, idx, strategy.inputs[0])
    leaves, tree = pytree.tree_flatten((node.args, node.kwargs))
    arg_nodes = [leaf for leaf in leaves if isinstance(leaf, Node)]
    j = 0
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Node):
            u, idx = input_source(node, j, arg_nodes)
            leaves[i] = get(u, idx, strategy.inputs[j])
            j += 1
    args, kwargs = pytree.tree_unflatten(leaves, tree)
    target, args, kwargs = node.target, list(args), dict(kwargs)
    localize = get_localizer(target)
    if localize is not None:
        target, args, kwargs = localize(node, args, kwargs, strategy, mesh.shape, RankCoords.of(mesh, batch_norm))
    if device is not None and "device" in kwargs:
        kwargs["device"] = device
    return graph.call_function(target, tuple(args), kwargs)
