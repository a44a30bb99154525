"""``solve_with_recompute`` keeps ``time_limit_s`` as one budget for all its solves on a 3-D mesh:
checked on a fake clock that advances only when an ILP runs, by the whole limit it is given (the
worst case: every solve stops at its limit), so the limits handed to the ILPs must sum to at most
the budget. The presolve and the merged-mesh start are computed once, and the plan returned is no
slower than the best start (the families, evaluated independently here)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

import fxpar
from fxpar.cost import CostModel
from fxpar.planner import solve_with_recompute
from fxpar.solve import ilp, warmstart
from fxpar.solve.presolve import presolve
from fxpar.solve.problem import build_problem
from fxpar.solve.strategies import all_strategies

from .test_solvers import _graph

MESH = (2, 2, 2)


class _Clock:
    def __init__(self):
        self.now = 100.0
        self.presolve_deadlines: list[float] = []

    def __call__(self):
        return self.now


def _problem():
    gm = _graph("small-mlp")
    cost = CostModel(fxpar.preset("a100-nvlink-8", num_devices=math.prod(MESH)), MESH)
    return build_problem(gm, all_strategies(gm, MESH), cost)


@pytest.fixture
def instrumented(monkeypatch):
    """(clock, limits, calls): each ILP (``ilp.solve`` with ``presolve=False``) runs for real with
    a generous limit, is reported unproven, and advances the fake clock by the limit it was given."""
    clock = _Clock()
    limits: list[float] = []
    calls = {"presolve": 0, "merged": 0}
    real_solve, real_presolve, real_merged = ilp.solve, warmstart.presolve, warmstart.merged_axes_plan

    def fake_solve(problem, *, time_limit_s=60.0, presolve=True, **kw):
        if presolve:
            return real_solve(problem, time_limit_s=time_limit_s, presolve=True, **kw)
        limits.append(time_limit_s)
        assert time_limit_s > 0, "an ILP was started with no time left"
        sol = real_solve(problem, time_limit_s=60.0, presolve=False, **kw)
        clock.now += time_limit_s
        return replace(sol, status="feasible (time limit)")

    def counting_presolve(problem, **kw):
        calls["presolve"] += 1
        clock.presolve_deadlines.append(kw["deadline"])
        return real_presolve(problem, **kw)

    def counting_merged(problem, time_limit_s):
        calls["merged"] += 1
        return real_merged(problem, time_limit_s)

    monkeypatch.setattr(warmstart, "clock", clock)
    monkeypatch.setattr(ilp, "solve", fake_solve)
    monkeypatch.setattr(warmstart, "presolve", counting_presolve)
    monkeypatch.setattr(warmstart, "merged_axes_plan", counting_merged)
    return clock, limits, calls


@pytest.mark.parametrize("recompute", [True, False])
def test_the_solves_share_one_budget_on_a_3d_mesh(instrumented, recompute):
    clock, limits, calls = instrumented
    problem = _problem()
    budget = 9.0
    start = clock.now
    sol = solve_with_recompute(problem, time_limit_s=budget, recompute=recompute)
    # merged-mesh ILP, the axis-by-axis search's first (stopped at its deadline), then the solves
    # without a memory limit, keeping activations, recomputing
    assert len(limits) == (5 if recompute else 4)
    assert sum(limits) <= budget * (1 + 1e-12)
    assert clock.now - start <= budget * (1 + 1e-12)
    assert calls == {"presolve": 2, "merged": 1}  # the full problem's presolve and the merged mesh's, once each
    assert all(d <= start + budget for d in clock.presolve_deadlines)  # each presolve is bounded within the budget
    reduced = presolve(problem).problem
    family = warmstart.best_family(reduced)
    assert family is not None
    assert sol.objective <= family[2] * (1 + 1e-9)
    if not sol.recompute:
        assert sol.objective == pytest.approx(problem.cost_of(sol.choice), rel=1e-12)


def test_no_ilp_starts_after_the_budget_is_spent(instrumented, monkeypatch):
    """When the preparation takes the whole budget, no ILP runs and the best start is the plan."""
    clock, limits, calls = instrumented
    problem = _problem()
    real_prepare = warmstart.prepare

    def slow_prepare(p, *, deadline, **kw):
        prep = real_prepare(p, deadline=deadline, **kw)
        if p is problem:  # not the merged mesh's own solve
            clock.now = deadline + 1.0
        return prep

    monkeypatch.setattr(warmstart, "prepare", slow_prepare)
    sol = solve_with_recompute(problem, time_limit_s=3.0, recompute=True)
    # only the merged mesh's ILP and the axis-by-axis search's first, inside the preparation
    assert len(limits) == 2 and calls["merged"] == 1
    reduced = presolve(problem).problem
    best = warmstart.best_family(reduced)[2]
    assert sol.status == "feasible (time limit)"
    assert sol.objective <= best * (1 + 1e-9)


def test_building_the_ilp_stops_at_its_time_limit(monkeypatch):
    """The edges' linearization (most of a large model's build) checks the limit as it goes: with
    the limit spent before it starts, no edge's resharding costs are even looked up."""
    problem = _problem()
    calls = [0]
    real = problem.cost_matrix

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(problem, "cost_matrix", counting)
    with pytest.raises(ilp.SolverTimeout, match="spent building the model"):
        ilp.solve(problem, time_limit_s=1e-9, presolve=False)
    assert calls[0] == 0
    assert ilp.solve(problem, time_limit_s=60.0, presolve=False).status == "optimal"
    assert calls[0] > 0
