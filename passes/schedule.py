"""Schedule pass: issue the collectives that need only the batch at the start of a rank's step.

The rewrite emits a resharded value where its first consumer needs it, so each collective is
issued and waited for on the spot. Some values depend on the batch alone, not on any parameter or
any other collective: a loss's targets, a mask of the valid ones, token positions. Their
collectives can start before the first layer runs and complete while the forward computes; only
their ``wait_tensor`` stays where the value is first used. This pass moves every such collective,
with the batch-only ops it reads, to just after the placeholders, in their original order (every
rank's graph has the same structure, so every rank issues its collectives in the same order).
What it moves is small and made once: ops on the step's inputs that no parameter enters.
Parameters' collectives are not moved (a ZeRO-3 all-gather issued at the start would hold every
gathered parameter at once).

Torch's own reordering works inside Inductor's scheduler (``reorder_for_compute_comm_overlap``):
its ``raise_comms`` issues every collective as early as its inputs allow, parameters' all-gathers
included, and the eager step does not run it. So the decision is made here, on the FX graph that
both steps run, and the compiled step uses only Inductor's ``sink_waits``, to keep each wait where
this graph reads the value (``fxpar.runtime.codegen.INDUCTOR_OPTIONS``).

Reads the placeholders' names (``roots``: those of the step's batch inputs); writes no
``node.meta`` keys. In place; returns ``gm``.

Before (rank 0 of a data-parallel loss whose target mask is summed replicated)::

    %inputs_2 = placeholder                          # this rank's targets
    %addmm = aten.addmm(%params_2, %inputs_1, %t)    # ... the forward ...
    %ne = aten.ne(%inputs_2, -100)
    %all_gather = _c10d_functional.all_gather_into_tensor(%ne, 2, "<axis 0 group>")
    %wait_tensor = _c10d_functional.wait_tensor(%all_gather)
    %sum_1 = aten.sum(%wait_tensor)

After::

    %inputs_2 = placeholder
    %ne = aten.ne(%inputs_2, -100)
    %all_gather = _c10d_functional.all_gather_into_tensor(%ne, 2, "<axis 0 group>")
    %addmm = aten.addmm(%params_2, %inputs_1, %t)    # ... the forward, while %ne travels ...
    %wait_tensor = _c10d_functional.wait_tensor(%all_gather)
    %sum_1 = aten.sum(%wait_tensor)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import torch
from torch.fx import Graph, GraphModule, Node

__all__ = ["issue_batch_collectives_early", "move_batch_collectives"]

_functional = torch.ops._c10d_functional
_WAIT = _functional.wait_tensor.default


def _is_collective(node: Node) -> bool:
    """A functional collective's start (not its ``wait_tensor``)."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.namespace == "_c10d_functional" and target is not _WAIT)


def issue_batch_collectives_early(gm: GraphModule, roots: Collection[str]) -> GraphModule:
    """Move every collective whose input depends only on the placeholders named in ``roots`` (and
    on constants), together with the ops that make that input, to just after the last placeholder,
    keeping their order. A value that passed through a collective is not batch-only: a chain of
    reshard steps moves only its first collective."""
    if move_batch_collectives(gm.graph, roots):
        gm.graph.lint()
        gm.recompile()
    return gm


def made_from(nodes: Iterable[Node], is_root: Callable[[Node], bool], through: Callable[[Node], bool]) -> set[Node]:
    """The nodes computed from the root placeholders alone (``is_root``; constants count as roots):
    the roots, every ``get_attr``, and every ``call_function`` that ``through`` accepts whose inputs
    are all in the set. ``nodes`` in topological order. Both the rewrite (which collectives it may
    issue at the start of the step) and the cost model (which collectives are not waited for
    between computations) read it."""
    out: set[Node] = set()
    for node in nodes:
        if node.op == "placeholder":
            if is_root(node):
                out.add(node)
        elif node.op == "get_attr":
            out.add(node)
        elif node.op == "call_function" and through(node) and all(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def move_batch_collectives(graph: Graph, roots: Collection[str]) -> int:
    """``issue_batch_collectives_early`` on a graph not yet in a GraphModule (the rewrite's, before
    its one code generation); returns how many nodes moved."""
    batch_only = made_from(graph.nodes, lambda node: node.target in roots,
                           lambda node: node.target is not _WAIT and not _is_collective(node))
    moved: list[Node] = []
    chosen: set[Node] = set()

    def take(node: Node) -> None:
        if node in chosen or node.op == "placeholder":
            return
        for a in node.all_input_nodes:
            take(a)
        chosen.add(node)
        moved.append(node)

    for node in graph.nodes:
        if _is_collective(node) and node.all_input_nodes and all(a in batch_only for a in node.all_input_nodes):
            take(node)
    if not moved:
        return 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    moved.sort(key=order.__getitem__)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    assert placeholders and all(order[p] < order[moved[0]] for p in placeholders), "placeholders come first"
    cursor = placeholders[-1]
    for node in moved:
        cursor.append(node)
        cursor = node
    return len(moved)
