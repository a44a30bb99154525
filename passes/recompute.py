"""Recompute pass: duplicate the forward ops a plan recomputes at their first backward use.

``apply_recompute(gm, plan, assignment)`` reads ``plan.recompute`` (names of forward ops chosen by
the ILP, ``fxpar.solve.recompute``) and returns a copy of the global joint graph in which the
backward reads copies of those ops' values instead of the forward's, so the forward values die
after their last forward use. The copies of an op ``d`` (``d`` itself, its ``getitem`` nodes and the
forward views of its values that a copy or the backward reads) are placed right before the node at
its host ``p(d)``: its first backward use, or the host of a recomputed op that reads it, whichever
is earlier, so a chain of recomputed ops is recomputed from its start. A copy reads the copy of an
input that is recomputed and the forward value of one that is kept. Copies carry their original's
strategy in the returned assignment, so the rewrite reshards their inputs as it does the
original's. Recomputed ops are deterministic (random ops are never chosen), so the step computes
the same values.

Writes ``node.meta["fxpar_recomputed_from"]`` (the original's name) on copies; ``gm.meta`` is
copied to the new graph.

Before (``%relu`` recomputed)::

    %mm = aten.mm(%x, %w); %relu = aten.relu(%mm); %mm_1 = aten.mm(%relu, %w2) ...
    %t = aten.t(%relu); %mm_2 = aten.mm(%t, %grad)

After::

    %mm = aten.mm(%x, %w); %relu = aten.relu(%mm); %mm_1 = aten.mm(%relu, %w2) ...
    %relu_recomputed = aten.relu(%mm); %t = aten.t(%relu_recomputed); %mm_2 = aten.mm(%t, %grad)
"""

from __future__ import annotations

from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from fxpar.errors import PlanMismatchError
from fxpar.solve.recompute import INF, analyze

__all__ = ["apply_recompute"]


def apply_recompute(gm: GraphModule, plan, assignment: dict) -> tuple[GraphModule, dict]:
    """The graph with ``plan.recompute`` recomputed and the assignment of its nodes (the copies get
    their original's strategy). With nothing to recompute, ``gm`` and ``assignment`` unchanged."""
    names = list(getattr(plan, "recompute", None) or [])
    if not names:
        return gm, assignment
    return recompute_nodes(gm, names, assignment)


def recompute_nodes(gm: GraphModule, names: list[str], assignment: dict | None = None) -> tuple[GraphModule, dict]:
    """``apply_recompute`` for a list of node names (``assignment`` may be None for a graph run
    without a plan, e.g. on one device)."""
    a = analyze(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    chosen = []
    for name in names:
        d = by_name.get(name)
        if d is None or d not in a.decisions:
            raise PlanMismatchError(
                f"the plan recomputes %{name}, which is not a forward op of this graph that can be recomputed; "
                "plan again for this model"
            )
        chosen.append(d)
    hosts = a.hosts(chosen)
    at: dict[Node, list[Node]] = {}  # host node -> decisions copied right before it
    nodes = list(gm.graph.nodes)
    for d in sorted(chosen, key=a.order.__getitem__):
        if hosts[d] < INF:
            at.setdefault(nodes[int(hosts[d])], []).append(d)

    graph = Graph()
    graph._codegen = gm.graph._codegen  # the same calling convention (pytree of params, buffers, inputs)
    env: dict[Node, Node] = {}
    copies: dict[Node, Node] = {}  # original -> its copy
    origin: dict[Node, Node] = {}  # copy -> original
    late = a.loss_pos

    def copy_group(d: Node) -> None:
        members = sorted(a.members(d), key=a.order.__getitem__)
        for n in members:
            args, kwargs = map_arg((n.args, n.kwargs), lambda u: copies.get(u, env[u]))
            new = graph.create_node(n.op, n.target, args, kwargs, name=f"{n.name}_recomputed")
            new.meta = dict(n.meta)
            new.meta["fxpar_recomputed_from"] = n.name
            new.meta["fxpar_phase"] = "backward"
            copies[n] = new
            origin[new] = n

    for n in nodes:
        for d in at.get(n, ()):
            copy_group(d)
        if n.op == "output":
            env[n] = graph.node_copy(n, lambda u: env[u])
        elif a.order[n] > late:
            env[n] = graph.node_copy(n, lambda u: copies.get(u, env[u]))
        else:
            env[n] = graph.node_copy(n, lambda u: env[u])
    # Copies of views no one reads (a view a kept decision would have read) are dropped.
    for new in reversed(list(graph.nodes)):
        if new in origin and not new.users:
            graph.erase_node(new)
            del origin[new]
    out = GraphModule(gm, graph)
    out.meta.update(gm.meta)
    new_assignment = None
    if assignment is not None:
        new_assignment = {env[n]: s for n, s in assignment.items() if n in env}
        for new, n in origin.items():
            new_assignment[new] = assignment[n]
    return out, new_assignment
