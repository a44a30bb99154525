"""The ILP against brute force: on small graphs its optimum is the best of all assignments."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

import fxpar
import fxpar.planner as planner
from fxpar.cost import CostModel
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.solve.ilp import SOLVERS, build_problem, min_memory, min_memory_found, solve
from fxpar.solve.strategies import all_strategies


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 512))

    def forward(self, x):
        return torch.relu(x @ self.w).sum()


def _problem(cluster_name: str, batch: int, mesh=(2,)):
    gm = capture_and_annotate(Tiny(), (torch.randn(batch, 64),))
    cluster = fxpar.preset(cluster_name, num_devices=math.prod(mesh))
    return build_problem(gm, all_strategies(gm, mesh), CostModel(cluster, mesh), simplify=False)


def _brute_force(problem, budget=None):
    """The least ``cost_of`` (the objective computed directly, overlap included) of all assignments."""
    nodes = problem.nodes
    best, best_choice = float("inf"), None
    for combo in itertools.product(*[range(len(problem.strategies[n])) for n in nodes]):
        choice = dict(zip(nodes, combo))
        cost = problem.cost_of(choice)
        if cost < best - 1e-15 and (budget is None or problem.memory_of(choice) <= budget):
            best, best_choice = cost, choice
    return best, best_choice


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("cluster_name, batch", [("cpu-local", 8), ("a100-nvlink-8", 4096), ("v100-pcie-4", 2)])
def test_ilp_optimum_equals_brute_force(cluster_name, batch, solver):
    problem = _problem(cluster_name, batch)
    sol = solve(problem, solver=solver)
    best, _ = _brute_force(problem)
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(best, rel=1e-9)
    # The linearized objective the solver optimized is the directly computed cost.
    assert sol.bound == pytest.approx(sol.objective, rel=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_ilp_optimum_equals_brute_force_under_a_memory_bound(solver):
    problem = _problem("a100-nvlink-8", 64)
    free = solve(problem, solver=solver)
    least = min_memory(problem, solver=solver)
    assert least < problem.memory_of(free.choice)
    # A budget between the least any plan needs and what the unconstrained optimum needs.
    problem.memory_budget = (least + problem.memory_of(free.choice)) / 2
    sol = solve(problem, solver=solver)
    best, choice = _brute_force(problem, problem.memory_budget)
    assert choice is not None
    assert sol.objective == pytest.approx(best, rel=1e-9)
    assert problem.memory_of(sol.choice) <= problem.memory_budget
    assert sol.objective >= free.objective


def test_min_memory_equals_brute_force_and_says_when_it_is_proven():
    problem = _problem("a100-nvlink-8", 64)
    least, proven = min_memory_found(problem)
    assert proven
    assert least == pytest.approx(min(problem.memory_of(dict(zip(problem.nodes, ks)))
                                      for ks in itertools.product(*[range(len(problem.strategies[n])) for n in problem.nodes])), rel=1e-9)


def test_plans_are_deterministic(mlp_graph):
    _, _, gm = mlp_graph
    a, _ = plan_graph(gm, mesh_shape=(2, 2))
    b, _ = plan_graph(gm, mesh_shape=(2, 2))
    a.solver.pop("build_s"), a.solver.pop("solve_s"), b.solver.pop("build_s"), b.solver.pop("solve_s")
    assert a.to_json() == b.to_json()


def test_plan_json_round_trip(mlp_graph):
    model, inputs, gm = mlp_graph
    plan, _ = plan_graph(gm, mesh_shape=(2,))
    again = fxpar.Plan.from_json(plan.to_json())
    assert again == plan
    assert again.assignment(gm) == plan.assignment(gm)
    text = plan.explain()
    for name, _ in model.named_parameters():
        assert name in text
    assert "predicted step" in text and "solver: optimal" in text


def test_cluster_json_round_trip(tmp_path):
    for name in fxpar.cluster.PRESETS:
        c = fxpar.preset(name)
        path = tmp_path / f"{name}.json"
        c.save(path)
        assert fxpar.Cluster.load(path) == c


def test_cost_floor_bounds_every_assignment():
    problem = _problem("a100-nvlink-8", 64)
    floor = problem.cost_floor()
    costs = [problem.cost_of(dict(zip(problem.nodes, ks)))
             for ks in itertools.product(*[range(len(problem.strategies[n])) for n in problem.nodes])]
    assert 0 < floor <= min(costs)


def test_a_plan_stopped_without_a_bound_reports_the_gap_to_the_cost_floor(mlp_graph, monkeypatch):
    """A solve that stops with no useful bound (0, as on a 3-D mesh whose plan is a start) reports
    the gap to ``Problem.cost_floor`` instead of 100%."""
    _, _, gm = mlp_graph
    real = planner.solve_with_recompute

    def unbounded(problem, **kw):
        sol = real(problem, **kw)
        return dataclasses.replace(sol, bound=0.0, status="feasible (time limit)")

    monkeypatch.setattr(planner, "solve_with_recompute", unbounded)
    with pytest.warns(fxpar.FallbackWarning, match="time limit"):
        plan, problem = plan_graph(gm, mesh_shape=(2, 2))
    floor = problem.cost_floor()
    assert 0 < floor < plan.predicted_step_s
    assert plan.solver["gap"] == pytest.approx(1 - floor / plan.predicted_step_s, rel=1e-9)
