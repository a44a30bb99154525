"""Recomputation chosen by the ILP: against brute force over keep/recompute x strategies, against
today's liveness when nothing is recomputed, against the recomputed graph's own liveness, and as
the planner uses it (a memory that only recomputation makes fit)."""

from __future__ import annotations

import itertools
import math
import random
import warnings

import pytest
import torch
from torch import nn

import fxpar
from fxpar.cost import CostModel
from fxpar.errors import InfeasiblePlanError
from fxpar.models import GPT, MLP, GPTConfig
from fxpar.passes.recompute import recompute_nodes
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.solve.ilp import Infeasible, build_problem, min_memory, solve
from fxpar.solve.recompute import analysis_of, analyze, is_random, recompute_memory, recompute_time
from fxpar.solve.strategies import all_strategies


class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(16, 32))
        self.b = nn.Parameter(torch.randn(32, 32))
        self.c = nn.Parameter(torch.randn(32, 32))

    def forward(self, x):
        return torch.relu(torch.relu(torch.relu(x @ self.a) @ self.b) @ self.c).sum()


class Block(nn.Module):
    """Layer norm (three outputs), views, a GELU MLP and a residual: chains of recomputable ops."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x):
        h = x + self.proj(nn.functional.gelu(self.fc(self.ln(x))))
        return (h * h).sum()


def _problem(model, inputs, mesh, cluster="cpu-local"):
    gm = capture_and_annotate(model, inputs)
    cl = fxpar.preset(cluster, num_devices=math.prod(mesh))
    return gm, build_problem(gm, all_strategies(gm, mesh), CostModel(cl, mesh), simplify=False)


def _brute_force(problem, free, base, decisions, budget):
    """The least step time (recomputation included) of any strategies of ``free`` x subset of
    ``decisions`` that fits ``budget``, every other node at its ``base`` strategy."""
    best, best_choice, best_r = float("inf"), None, None
    subsets = [r for k in range(len(decisions) + 1) for r in itertools.combinations(decisions, k)]
    for combo in itertools.product(*[range(len(problem.strategies[n])) for n in free]):
        choice = dict(base)
        choice.update(zip(free, combo))
        step = problem.cost_of(choice)
        for r in subsets:
            cost = step + recompute_time(problem, choice, r)
            if cost < best - 1e-15 and recompute_memory(problem, choice, r) <= budget:
                best, best_choice, best_r = cost, choice, r
    return best, best_choice, best_r


def _fix(problem, base, free):
    for n in problem.nodes:
        if n not in free:
            problem.forced[n] = {base[n]}


def test_nothing_recomputed_is_todays_liveness():
    torch.manual_seed(0)
    for model, inputs, mesh in [(ThreeLayers(), (torch.randn(512, 16),), (2,)), (Block(), (torch.randn(8, 4, 16),), (2,))]:
        _, problem = _problem(model, inputs, mesh)
        rng = random.Random(0)
        for _ in range(20):
            choice = {n: rng.randrange(len(problem.strategies[n])) for n in problem.nodes}
            assert recompute_memory(problem, choice, ()) == pytest.approx(problem.memory_of(choice), rel=1e-12)


def test_ilp_equals_brute_force_over_strategies_and_recomputation():
    torch.manual_seed(0)
    _, problem = _problem(ThreeLayers(), (torch.randn(512, 16),), (2,))
    base = solve(problem).choice
    free = [n for n in problem.nodes if n.name in ("params_1", "params_2", "mm", "mm_1", "relu")]
    _fix(problem, base, free)
    decisions = sorted(analysis_of(problem).decisions, key=analysis_of(problem).order.__getitem__)
    assert {d.name for d in decisions} == {"mm", "relu", "mm_1", "relu_1", "mm_2", "relu_2"}
    low, high = min_memory(problem, recompute=True), min_memory(problem)
    assert low < high
    problem.memory_budget = float("inf")
    roomy = problem.memory_of(solve(problem).choice)  # the fastest plan keeping every activation
    recomputed_somewhere, chains = False, 0
    for budget in [low, (2 * low + high) / 3, high, max(1.5 * high, roomy)]:
        problem.memory_budget = budget
        best, choice, r = _brute_force(problem, free, base, decisions, budget)
        sol = solve(problem, recompute=True)
        assert sol.status == "optimal"
        assert sol.objective == pytest.approx(best, rel=1e-9)
        assert recompute_memory(problem, sol.choice, sol.recompute) <= budget * (1 + 1e-9)
        recomputed_somewhere |= bool(sol.recompute)
        chosen = set(sol.recompute)
        chains += any(w in chosen for d in chosen for w in analysis_of(problem).decisions[d].readers)
        if budget >= roomy:
            # Where the fastest plan keeping every activation fits, recomputing is never chosen: it only costs.
            assert sol.recompute == [] and r == ()
            assert sol.objective == pytest.approx(solve(problem).objective, rel=1e-9)
    assert recomputed_somewhere
    assert chains  # some budget recomputes an op from a recomputed input (relu from its matmul)


def test_ilp_equals_brute_force_over_chains_through_layer_norm_and_views():
    """Strategies fixed, every subset of the block's recomputable ops (chains among them), at several budgets."""
    torch.manual_seed(0)
    _, problem = _problem(Block(), (torch.randn(8, 4, 16),), (2,))
    base = solve(problem).choice
    free = [n for n in problem.nodes if n.name in ("params_3", "addmm")]  # fc.weight and its matmul
    _fix(problem, base, free)
    a = analysis_of(problem)
    decisions = sorted(a.decisions, key=a.order.__getitem__)
    names = {d.name for d in decisions}
    assert "native_layer_norm" in names and "gelu" in names and len(decisions) <= 9
    low, high = min_memory(problem, recompute=True), min_memory(problem)
    assert low < high
    recomputed = 0
    for budget in [low, (3 * low + high) / 4, (low + high) / 2, (low + 3 * high) / 4, high]:
        problem.memory_budget = budget
        best, _, r = _brute_force(problem, free, base, decisions, budget)
        sol = solve(problem, recompute=True)
        assert sol.objective == pytest.approx(best, rel=1e-9)
        assert recompute_memory(problem, sol.choice, sol.recompute) <= budget * (1 + 1e-9)
        recomputed += bool(sol.recompute)
    assert recomputed


def test_the_model_bounds_the_recomputed_graphs_liveness():
    """Recomputing any subset and measuring the resulting graph with the planner's own liveness (no
    recomputation) never exceeds what the recomputation model predicted for it."""
    torch.manual_seed(0)
    lowered = 0
    for model, inputs in [(ThreeLayers(), (torch.randn(512, 16),)), (Block(), (torch.randn(8, 4, 16),))]:
        gm, problem = _problem(model, inputs, (2,))
        choice = solve(problem).choice
        assignment = {n: problem.strategies[n][k] for n, k in choice.items()}
        a = analysis_of(problem)
        decisions = sorted(a.decisions, key=a.order.__getitem__)
        rng = random.Random(1)
        subsets = [decisions] + [[d for d in decisions if rng.random() < 0.5] for _ in range(6)]
        subsets += [[d] for d in decisions]
        for r in subsets:
            new, new_assignment = recompute_nodes(gm, [d.name for d in r], assignment)
            strategies = {n: [new_assignment[n]] for n in new_assignment}
            measured = build_problem(new, strategies, problem.cost_model, simplify=False)
            actual = measured.memory_of({n: 0 for n in measured.nodes})
            predicted = recompute_memory(problem, choice, r)
            # The recomputed graph counts a multi-output copy with its getitems (as today's model does
            # for any multi-output op); the recomputation model counts their storage once.
            doubled = sum(problem.act_mem[g][choice[g]] for d in r for g in a.decisions[d].getitems)
            assert actual <= predicted + doubled + 1e-6
        lowered += min(recompute_memory(problem, choice, r) for r in subsets) < problem.memory_of(choice)
    assert lowered  # recomputation lowers the peak of some model (not where it lies in the backward)


def test_random_ops_are_never_recomputed():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, d_model=16, n_head=2, seq_len=8, vocab_size=32, dropout=0.1))
    gm = capture_and_annotate(model, model.example_inputs(4))
    a = analyze(gm)
    dropouts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.native_dropout.default]
    assert dropouts and all(is_random(n) for n in dropouts)
    assert not any(is_random(d) for d in a.decisions)
    # Attention without dropout draws nothing and may be recomputed.
    assert any("scaled_dot_product" in str(d.target) for d in a.decisions)


@pytest.fixture(scope="module")
def activation_heavy_mlp():
    """fxpar.models' MLP where activations outweigh the weights (a large batch of narrow layers)."""
    torch.manual_seed(0)
    model = MLP((32, 64, 64, 64, 10))
    gm = capture_and_annotate(model, model.example_inputs(2048))
    cluster = fxpar.preset("cpu-local")
    problem = build_problem(gm, all_strategies(gm, (2,)), CostModel(cluster, (2,)))
    return gm, cluster, min_memory(problem, recompute=True), min_memory(problem)


def test_a_memory_only_recomputation_fits_plans_and_without_it_is_infeasible(activation_heavy_mlp):
    gm, cluster, low, high = activation_heavy_mlp
    assert low < 0.9 * high
    tight = cluster.with_memory((low + high) / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, _ = plan_graph(gm, cluster=tight, mesh_shape=(2,))
    assert plan.recompute
    assert plan.memory_bytes <= tight.device.memory_bytes
    assert plan.solver["memory_kept_bytes"] > tight.device.memory_bytes
    text = plan.explain()
    assert "recomputed in the backward pass" in text and f"%{plan.recompute[0]}" in text
    assert fxpar.Plan.from_json(plan.to_json()).recompute == plan.recompute
    with pytest.raises(InfeasiblePlanError) as info:
        plan_graph(gm, cluster=tight, mesh_shape=(2,), recompute=False)
    message = str(info.value)
    # Both least memories: keeping every activation, and recomputing (which this budget allows).
    assert "with activations recomputed (recompute=True)" in message and message.count("iB") >= 3
    with pytest.raises(InfeasiblePlanError):
        plan_graph(gm, cluster=cluster.with_memory(0.98 * low), mesh_shape=(2,))


def test_ample_memory_gives_the_plan_without_recomputation(activation_heavy_mlp):
    """Where the fastest plan keeping every activation fits, it is the plan, byte for byte."""
    gm, cluster, _, _ = activation_heavy_mlp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        free, _ = plan_graph(gm, cluster=cluster, mesh_shape=(2,), recompute=False)
    for memory in (cluster.device.memory_bytes, 1.02 * free.memory_bytes):
        roomy = cluster.with_memory(memory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            on, _ = plan_graph(gm, cluster=roomy, mesh_shape=(2,))
            off, _ = plan_graph(gm, cluster=roomy, mesh_shape=(2,), recompute=False)
        assert on.recompute == []
        assert on.to_json() == off.to_json()


def test_recomputation_never_makes_a_fitting_plan_slower(activation_heavy_mlp):
    gm, cluster, low, high = activation_heavy_mlp
    cost_model = CostModel(cluster, (2,))
    problem = build_problem(gm, all_strategies(gm, (2,)), cost_model)
    for memory in (high, (low + 3 * high) / 4):
        problem.memory_budget = memory
        try:
            kept = solve(problem).objective
        except Infeasible:
            kept = math.inf
        both = solve(problem, recompute=True)
        assert both.objective <= kept * (1 + 1e-9)


def test_a_gigabyte_model_plans_within_its_budget():
    """Byte counts of 1e9 in the scaled memory rows: the plan's memory, evaluated directly, fits the
    device (a row's bytes variables once had coefficients too small for the solver to keep)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=2))
        inputs = model.example_inputs(32)
    gm = capture_and_annotate(model, inputs)
    cluster = fxpar.preset("a100-nvlink-8")
    problem = build_problem(gm, all_strategies(gm, (8,)), CostModel(cluster, (8,)))
    low, high = min_memory(problem, recompute=True), min_memory(problem)
    assert 0 < low < high
    for memory in (low + 0.2 * (high - low), (low + high) / 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan, planned = plan_graph(gm, cluster=cluster.with_memory(memory), mesh_shape=(8,))
        assert plan.recompute
        choice = {n: planned.strategies[n].index(plan.strategies[n.name]) for n in planned.nodes}
        by_name = {n.name: n for n in planned.nodes}
        assert recompute_memory(planned, choice, [by_name[r] for r in plan.recompute]) <= memory
        assert plan.memory_bytes <= memory


def test_plan_json_keeps_recompute_in_graph_order_and_checks_it(activation_heavy_mlp):
    import json

    from fxpar.errors import PlanFileError

    gm, cluster, low, high = activation_heavy_mlp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, _ = plan_graph(gm, cluster=cluster.with_memory((low + high) / 2), mesh_shape=(2,))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    assert plan.recompute == sorted(plan.recompute, key=order.__getitem__)
    text = plan.to_json()
    assert json.loads(text)["recompute"] == plan.recompute
    assert fxpar.Plan.from_json(text).to_json() == text
    for bad in ([1], "addmm", ["no_such_node"]):
        d = json.loads(text)
        d["recompute"] = bad
        with pytest.raises(PlanFileError, match="recompute"):
            fxpar.Plan.from_json(json.dumps(d))
    # A plan that recomputes nothing writes no key, so its text is what it was before recomputation.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roomy, _ = plan_graph(gm, cluster=cluster, mesh_shape=(2,))
    assert "recompute" not in json.loads(roomy.to_json())
