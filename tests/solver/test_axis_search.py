"""The axis-by-axis search (``fxpar.solve.axis_search``) on a 3-D mesh: each neighbourhood is
exactly the strategies that place every tensor on its axis as the plan does; the search never
returns a plan slower than its start or one over the memory budget; where it converges, its plan
is the optimum of each of its neighbourhoods (each solved again here, apart from the search) and
no faster than the full problem's proven optimum; it stops at its deadline."""

from __future__ import annotations

import time

import pytest

from fxpar.solve import ilp
from fxpar.solve.axis_search import improve_by_axes, neighbourhood
from fxpar.solve.presolve import _restrict
from fxpar.solve.warmstart import greedy_plan

from .test_time_budget import MESH, _problem


def _placements(strategy, axis):
    return [spec[axis] for spec in (*strategy.inputs, *strategy.outputs)]


def test_a_neighbourhood_is_the_strategies_that_agree_on_its_axis():
    problem = _problem()
    plan = greedy_plan(problem, "fully sharded")
    for axis in range(len(MESH)):
        keep = neighbourhood(problem, plan, axis)
        for n in problem.nodes:
            want = _placements(problem.strategies[n][plan[n]], axis)
            agree = [k for k, s in enumerate(problem.strategies[n]) if _placements(s, axis) == want]
            assert keep[n] == agree
            assert plan[n] in keep[n]
    sizes = [sum(len(ks) for ks in neighbourhood(problem, plan, 0).values()), sum(len(s) for s in problem.strategies.values())]
    assert sizes[0] < sizes[1]  # a restriction, not the whole problem


def test_the_search_converges_to_each_neighbourhoods_optimum():
    problem = _problem()
    start = greedy_plan(problem, "data parallel")
    start_cost = problem.cost_of(start)
    found = improve_by_axes(problem, start, deadline=time.perf_counter() + 120, clock=time.perf_counter)
    assert found.converged and found.moves > 0
    assert found.cost == pytest.approx(problem.cost_of(found.choice), rel=1e-12)
    assert found.cost < start_cost
    for axis in range(len(MESH)):
        keep = neighbourhood(problem, found.choice, axis)
        optimum = ilp.solve(_restrict(problem, keep), presolve=False)
        assert optimum.status == "optimal"
        assert found.cost == pytest.approx(optimum.objective, rel=1e-9), axis
    best = ilp.solve(problem, presolve=False)
    assert best.status == "optimal"
    assert found.cost >= best.objective * (1 - 1e-9)


def test_the_search_keeps_the_memory_budget():
    problem = _problem()
    start = greedy_plan(problem, "fully sharded")
    free = improve_by_axes(problem, start, deadline=time.perf_counter() + 120, clock=time.perf_counter)
    problem.memory_budget = problem.memory_of(start) * 1.01
    assert problem.memory_of(free.choice) > problem.memory_budget  # the budget binds the search
    found = improve_by_axes(problem, start, deadline=time.perf_counter() + 120, clock=time.perf_counter)
    assert found.moves > 0
    assert problem.memory_of(found.choice) <= problem.memory_budget
    assert found.cost < problem.cost_of(start)


def test_the_search_stops_at_its_deadline():
    problem = _problem()
    start = greedy_plan(problem, "data parallel")
    found = improve_by_axes(problem, start, deadline=0.0, clock=lambda: 1.0)
    assert found.solves == 0 and not found.converged and found.choice == start
