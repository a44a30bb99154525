"""Gradient synchronization that runs asynchronously hides behind backward compute, in the model
(checked against a hand evaluation of every edge) and in the rewritten graph (start/wait pairs)."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.models import MLP
from fxpar.passes.rewrite import rewrite
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.reshard import reshard_steps
from fxpar.solve.ilp import solve


def _ddp_setup():
    torch.manual_seed(0)
    model = MLP((256, 1024, 1024, 256))
    gm = capture_and_annotate(model, model.example_inputs(2048))
    plan, problem = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8"), mesh_shape=(8,))
    choice = {n: problem.strategies[n].index(plan.strategies[n.name]) for n in problem.nodes}
    return gm, plan, problem, choice


def test_exposed_sync_is_what_backward_compute_cannot_hide():
    gm, plan, problem, choice = _ddp_setup()
    grad_sync = last = 0.0
    for e in problem.edges:
        a, b = e.out_specs[choice[e.producer]], e.in_specs[choice[e.consumer]]
        steps = reshard_steps(a, b)
        if e.position == -1 and len(steps) == 1 and steps[0].kind in ("all_reduce", "reduce_scatter"):
            cost = problem.grad_sync_cost(e.tensor, a, b)  # bucketed, as the runtime runs it
            grad_sync += cost
            last += cost if e in problem.last_grads else 0.0
    assert grad_sync > 0, "a data-parallel plan synchronizes gradients"
    window = problem.overlap_efficiency * sum(
        problem.node_cost[n][choice[n]] for n in problem.nodes if n.meta["fxpar_phase"] == "backward"
    )
    parts = problem.breakdown(choice)
    assert parts["grad_sync"] == grad_sync
    eff = problem.overlap_efficiency
    expected = max(0.0, grad_sync - window, (1 - eff) * grad_sync, last)
    assert parts["exposed_grad_sync"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert plan.solver["hidden_grad_sync_s"] == grad_sync - parts["exposed_grad_sync"]
    # Its gradients (6 MB) fill one bucket, issued once the last of them exists: nothing hides.
    assert problem.last_grads == {e for e in problem.edges if e.position == -1}
    assert parts["exposed_grad_sync"] == pytest.approx(grad_sync, rel=1e-12)


def test_overlap_never_predicts_slower_and_the_solver_agrees_with_the_evaluation():
    gm, plan, problem, _ = _ddp_setup()
    problem.overlap = False
    serial = solve(problem)
    assert serial.objective >= plan.predicted_step_s
    problem.overlap = True
    overlapped = solve(problem)
    assert overlapped.objective == problem.cost_of(overlapped.choice)
    assert overlapped.bound <= overlapped.objective * (1 + 1e-6)


def test_rewrite_starts_gradient_sync_where_the_gradient_is_produced():
    gm, plan, problem, choice = _ddp_setup()
    local = rewrite(gm, plan.assignment(gm), (8,))
    nodes = list(local.graph.nodes)
    wait = torch.ops._c10d_functional.wait_tensor.default
    # Synchronous collectives are waited for at once; the gradient syncs only after all compute.
    last_compute = max(i for i, n in enumerate(nodes) if n.op == "call_function" and n.target is not wait)
    waits = [n for n in nodes[last_compute + 1:] if n.target is wait]
    starts = [w.args[0] for w in waits]
    async_edges = [
        e for e in problem.edges
        if problem.overlappable(e, e.out_specs[choice[e.producer]], e.in_specs[choice[e.consumer]])
    ]
    # And the loss, where it leaves as a Partial sum: its all-reduce joins the gradients'.
    loss = next(iter(gm.graph.output_node().args[0]))
    partial_loss = repr(plan.strategies[loss.name].outputs[0][0]) == "P"
    assert len(starts) == len(async_edges) + partial_loss > 0
    # All-reduces, and reduce-scatters for the parameters the plan shards (their update is cheaper).
    funcol = torch.ops._c10d_functional
    assert all(s.target in (funcol.all_reduce.default, funcol.reduce_scatter_tensor.default) for s in starts)
    assert any(nodes.index(s) < last_compute - len(starts) for s in starts), "no gradient sync is issued early"
