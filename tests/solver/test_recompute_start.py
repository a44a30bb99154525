"""Where memory forces recomputation and no plan keeping every activation fits, the solve that
chooses what to recompute starts from a plan that fits with recomputation
(``warmstart.recompute_start``), so that a time limit returns that plan rather than none; and the
solves that keep every activation are skipped where ``warmstart.kept_memory_floor`` shows none
can fit. Checked against the recomputation model's direct evaluator and brute force."""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch

import fxpar
import fxpar.planner as planner
from fxpar.cost import CostModel
from fxpar.models import MLP
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.solve import ilp, warmstart
from fxpar.solve.problem import build_problem
from fxpar.solve.recompute import analysis_of, recompute_memory, recompute_time
from fxpar.solve.strategies import all_strategies

MESH = (2,)


@pytest.fixture(scope="module")
def heavy():
    """(graph, cluster, problem, budget): fxpar.models' MLP where activations outweigh the weights,
    with a memory between the least that recomputing allows and the least keeping every activation."""
    torch.manual_seed(0)
    model = MLP((32, 64, 64, 64, 10))
    gm = capture_and_annotate(model, model.example_inputs(2048))
    cluster = fxpar.preset("cpu-local")
    problem = build_problem(gm, all_strategies(gm, MESH), CostModel(cluster, MESH))
    low, high = ilp.min_memory(problem, recompute=True), ilp.min_memory(problem)
    assert low < 0.9 * high
    budget = (low + high) / 2
    return gm, cluster.with_memory(budget), problem, budget


def _prepared(problem, budget):
    problem.memory_budget = budget
    return warmstart.prepare(problem, deadline=warmstart.clock() + 60)


def test_the_start_fits_and_costs_what_the_direct_evaluator_says(heavy):
    _, _, problem, budget = heavy
    prep = _prepared(problem, budget)
    assert prep.best_start(bounded=True) is None  # no family fits keeping every activation
    name, choice, recomputed, cost = warmstart.recompute_start(prep, deadline=warmstart.clock() + 60)
    reduced = prep.reduction.problem
    assert recomputed
    assert recompute_memory(reduced, choice, recomputed) <= budget
    original = prep.reduction.lift_choice(choice)
    assert cost == pytest.approx(problem.cost_of(original) + recompute_time(problem, original, recomputed), rel=1e-12)
    assert recompute_memory(problem, original, recomputed) <= budget


def test_the_starts_recomputation_is_within_its_gap_of_brute_force(heavy):
    """For the start's plan, no set of decisions that fits is more than 1% (its solve's gap) faster
    than the start's; the sets are unions of classes (repeated layers recompute alike, as in the
    ILP)."""
    _, _, problem, budget = heavy
    prep = _prepared(problem, budget)
    _, choice, recomputed, cost = warmstart.recompute_start(prep, deadline=warmstart.clock() + 60)
    reduced = prep.reduction.problem
    decisions = analysis_of(reduced).decisions
    classes: dict = {}
    for d in decisions:
        classes.setdefault(reduced.rep(d) if reduced.rep(d) in decisions else d, []).append(d)
    groups = list(classes.values())
    assert 2 <= len(groups) <= 12 and len(groups) < len(decisions)
    step = reduced.cost_of(choice)
    subsets = [[d for g in combo for d in g] for k in range(len(groups) + 1) for combo in itertools.combinations(groups, k)]
    best = min(step + recompute_time(reduced, choice, r) for r in subsets if recompute_memory(reduced, choice, r) <= budget)
    assert best <= cost * (1 + 1e-12)
    assert cost <= best * (1 + warmstart.START_OPTIONS["mip_rel_gap"]) + 1e-15


def test_a_time_limit_returns_the_start(heavy, monkeypatch):
    """The recomputation solve on the full problem finds nothing in its time (a stand-in solver
    that always times out): the plan is the start, its step and memory those of the direct
    evaluator on the plan's own strategies."""
    gm, cluster, problem, budget = heavy
    real = ilp.solve

    def no_time(p, *, presolve=True, options=None, **kw):
        if not presolve and options is None:  # the planner's solves, not the start's
            raise ilp.SolverTimeout("stand-in: no plan in time")
        return real(p, presolve=presolve, options=options, **kw)

    monkeypatch.setattr(ilp, "solve", no_time)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, built = plan_graph(gm, cluster=cluster, mesh_shape=MESH, time_limit_s=1.0)
    assert plan.solver["status"] == "feasible (time limit)" and plan.recompute
    choice = {n: next(k for k, s in enumerate(built.strategies[n]) if s == plan.strategies[n.name]) for n in built.nodes}
    recomputed = [n for n in built.nodes if n.name in set(plan.recompute)]
    assert plan.predicted_step_s == pytest.approx(built.cost_of(choice) + recompute_time(built, choice, recomputed), rel=1e-12)
    assert plan.memory_bytes == pytest.approx(recompute_memory(built, choice, recomputed), rel=1e-12)
    assert plan.memory_bytes <= budget
    with pytest.raises(fxpar.errors.PlanTimeoutError):  # without the start: no plan
        monkeypatch.setattr(warmstart, "recompute_start", lambda prep, deadline: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan_graph(gm, cluster=cluster, mesh_shape=MESH, time_limit_s=1.0)


def test_kept_memory_floor_bounds_every_assignment(heavy):
    _, _, problem, _ = heavy
    floor = warmstart.kept_memory_floor(problem)
    rng = random.Random(0)
    for _ in range(200):
        choice = {}
        for n in problem.nodes:
            v = problem.rep(n)
            if v not in choice:
                choice[v] = rng.randrange(len(problem.strategies[v]))
        choice = {n: choice[problem.rep(n)] for n in problem.nodes}
        assert floor <= problem.memory_of(choice) * (1 + 1e-12)
    # Not vacuous: the least memory keeping every activation is close to it.
    assert floor >= 0.5 * ilp.min_memory(problem)


def test_skipping_the_kept_solves_changes_no_plan(heavy, monkeypatch):
    """A budget under the floor: the planner's plan is the same with the kept-activation solves
    skipped as with them run (and found infeasible)."""
    gm, cluster, problem, _ = heavy
    floor = warmstart.kept_memory_floor(problem)
    low = ilp.min_memory(problem, recompute=True)
    if not low < floor:
        pytest.skip("no budget between the least memory with recomputation and the floor")
    tight = cluster.with_memory((low + floor) / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped, _ = plan_graph(gm, cluster=tight, mesh_shape=MESH)
        monkeypatch.setattr(planner.warmstart, "kept_memory_floor", lambda p: 0.0)
        run, _ = plan_graph(gm, cluster=tight, mesh_shape=MESH)
    assert skipped.solver["status"] == run.solver["status"] == "optimal"
    assert skipped.predicted_step_s == pytest.approx(run.predicted_step_s, rel=1e-9)
    assert skipped.recompute and skipped.memory_bytes <= tight.device.memory_bytes


def test_the_recomputation_ilp_of_a_fixed_plan_equals_brute_force(heavy):
    """At gap 0, the recomputation ILP of one plan (every node fixed; repeated layers share their
    decisions' variables) finds the fastest union of classes that fits, by the direct evaluator."""
    from fxpar.solve.presolve import _restrict

    _, _, problem, budget = heavy
    prep = _prepared(problem, budget)
    reduced = prep.reduction.problem
    for _, choice, _, _ in prep.starts:
        fixed = _restrict(reduced, {n: [choice[n]] for n in reduced.nodes})
        decisions = analysis_of(reduced).decisions
        classes: dict = {}
        for d in decisions:
            classes.setdefault(reduced.rep(d) if reduced.rep(d) in decisions else d, []).append(d)
        groups = list(classes.values())
        subsets = [[d for g in combo for d in g] for k in range(len(groups) + 1) for combo in itertools.combinations(groups, k)]
        fitting = [reduced.cost_of(choice) + recompute_time(reduced, choice, r) for r in subsets
                   if recompute_memory(reduced, choice, r) <= budget]
        try:
            sol = ilp.solve(fixed, recompute=True, presolve=False)
        except ilp.Infeasible:
            assert not fitting
            continue
        assert sol.status == "optimal"
        assert sol.objective == pytest.approx(min(fitting), rel=1e-9)
        assert recompute_memory(reduced, choice, sol.recompute) <= budget
