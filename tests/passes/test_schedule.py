"""The schedule pass: collectives of values made from the batch alone are issued at the start of
a rank's step and waited for where they are read; parameters' collectives stay where they are."""

from __future__ import annotations

import torch

import fxpar
from fxpar.models import MLP
from fxpar.passes.rewrite import rewrite
from fxpar.passes.schedule import issue_batch_collectives_early
from fxpar.planner import capture_and_annotate, plan_graph

funcol = torch.ops._c10d_functional
aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.addmm.default)


def _rank_graph(force: dict[str, str]):
    torch.manual_seed(0)
    model = MLP((16, 64, 32, 8))
    gm = capture_and_annotate(model, model.example_inputs(16))
    plan, _ = plan_graph(gm, cluster=fxpar.preset("cpu-local", num_devices=2), mesh_shape=(2,), force=force)
    return gm, plan, rewrite(gm, plan.assignment(gm), (2,))


def _collectives(graph) -> list:
    return [n for n in graph.nodes if getattr(n.target, "namespace", None) == "_c10d_functional"
            and n.target is not funcol.wait_tensor.default]


def _from_batch(node, inputs: set) -> bool:
    """Whether ``node`` reads only the batch (through ops that are not collectives)."""
    if node.op == "placeholder":
        return node.name in inputs
    if node.target is funcol.wait_tensor.default or node in _collectives(node.graph):
        return False
    return all(_from_batch(a, inputs) for a in node.all_input_nodes)


def _reads(node, names: set) -> bool:
    """Whether ``node`` depends on a placeholder named in ``names``."""
    return any(a.name in names if a.op == "placeholder" else _reads(a, names) for a in node.all_input_nodes)


def test_collectives_of_the_batch_alone_start_before_the_first_layer_and_are_waited_for_where_read():
    # The targets' side of the loss computed replicated: its inputs are gathered from the batch.
    gm, plan, local = _rank_graph({"layers.0.weight": "R", "layers.1.weight": "R", "layers.2.weight": "R",
                                   "sum_1": "R->R", "unsqueeze_1": "R->R"})
    inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.meta["fxpar_role"] == "input"}
    order = {n: i for i, n in enumerate(local.graph.nodes)}
    first_matmul = min(order[n] for n in local.graph.nodes if n.target in MATMULS)
    early = [c for c in _collectives(local.graph) if all(_from_batch(a, inputs) for a in c.all_input_nodes)]
    assert len(early) >= 2, [c.name for c in _collectives(local.graph)]
    waits = []
    for c in early:
        assert order[c] < first_matmul, c.name
        (wait,) = c.users
        assert wait.target is funcol.wait_tensor.default
        waits.append(wait)
    # The loss's are waited for where the loss reads them, after the forward's first layer (an
    # input gathered for the first layer is waited for right before it).
    assert sum(order[w] > first_matmul for w in waits) >= 2, [w.name for w in waits]


def test_a_parameters_all_gather_stays_where_it_is_read():
    # The last layer's weight is kept in halves and gathered for its matmul.
    gm, plan, local = _rank_graph({"layers.2.weight": "S(0)", "t_2": "R->R"})
    params = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.meta["fxpar_role"] == "param"}
    order = {n: i for i, n in enumerate(local.graph.nodes)}
    first_matmul = min(order[n] for n in local.graph.nodes if n.target in MATMULS)
    gathered = [c for c in _collectives(local.graph) if c.target is funcol.all_gather_into_tensor.default
                and not _from_batch(c.all_input_nodes[0], inputs=set()) and _reads(c, params)]
    assert gathered
    assert all(order[c] > first_matmul for c in gathered)


def test_the_pass_keeps_the_graph_valid_and_leaves_a_graph_without_such_collectives_unchanged():
    gm, plan, local = _rank_graph({"layers.0.weight": "R", "layers.1.weight": "R", "layers.2.weight": "R"})
    before = [n.name for n in local.graph.nodes]
    issue_batch_collectives_early(local, set())  # no batch input named: nothing moves
    assert [n.name for n in local.graph.nodes] == before
    local.graph.lint()
