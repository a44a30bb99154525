"""The simplified model (shared decisions for repeated layers, no resharding between cheap ops)
is a restriction of the exact one: never better than the exact optimum, and its reported cost is
the directly computed cost of the plan it returns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxpar
from fxpar.cost import CostModel
from fxpar.models import MLP
from fxpar.placement import R
from fxpar.planner import capture_and_annotate
from fxpar.solve.ilp import Infeasible, solve
from fxpar.solve.problem import _is_cheap, build_problem
from fxpar.solve.repeat import repeated_classes
from fxpar.solve.strategies import all_strategies


@pytest.fixture(scope="module")
def deep_mlp_graph():
    torch.manual_seed(0)
    model = MLP((64,) + (128,) * 6 + (10,))
    return capture_and_annotate(model, model.example_inputs(32))


def test_repeated_layers_share_classes(deep_mlp_graph):
    gm = deep_mlp_graph
    strategies = all_strategies(gm, (2, 2))
    nodes = list(strategies)
    classes = repeated_classes(nodes, strategies)
    num_classes = len(set(classes.get(n, n) for n in nodes))
    assert num_classes < 0.65 * len(nodes)
    for node, rep in classes.items():
        assert strategies[node] == strategies[rep]
    # The five identical hidden layers' weights share one decision.
    params = [n for n in nodes if n.op == "placeholder" and n.meta.get("fxpar_role") == "param"]
    hidden = [p for p in params if tuple(p.meta["val"].shape) == (128, 128)]
    assert len(hidden) == 5 and len({classes.get(p, p) for p in hidden}) == 1


@pytest.mark.parametrize("cluster_name, mesh", [("a100-nvlink-8", (2, 2)), ("v100-pcie-4", (4,)), ("cpu-local", (2,))])
def test_simplified_optimum_is_a_restriction_of_the_exact_one(deep_mlp_graph, cluster_name, mesh):
    gm = deep_mlp_graph
    cluster = dataclasses.replace(fxpar.preset(cluster_name), num_devices=4)
    cost = CostModel(cluster, mesh)
    exact = build_problem(gm, all_strategies(gm, mesh), cost, simplify=False)
    simple = build_problem(gm, all_strategies(gm, mesh), cost, simplify=True)
    best = solve(exact)
    restricted = solve(simple)
    assert restricted.objective >= best.objective * (1 - 1e-9)
    assert restricted.objective == pytest.approx(exact.cost_of(restricted.choice), rel=1e-12)
    assert restricted.bound == pytest.approx(restricted.objective, rel=1e-6)
    # Tied nodes got one strategy; no-reshard edges carry none.
    for node, rep in simple.classes.items():
        assert restricted.choice[node] == restricted.choice[rep]
    for e in simple.no_reshard:
        if len(set(e.out_specs)) > 1 and len(set(e.in_specs)) > 1:
            assert e.out_specs[restricted.choice[e.producer]] == e.in_specs[restricted.choice[e.consumer]]


def test_no_reshard_edges_that_would_empty_a_class_are_resharded():
    """A cheap op that can only be replicated feeding one that can only cut (dropout draws its
    mask per piece): with every cheap-to-cheap edge kept as it is, the simplified problem has no
    plan; build_problem reshards the edges that would empty a class. (Hugging Face's GPT-2 did this
    through a concatenation with an empty cache, which the cat rule now lets be cut.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.model(x), y)

    gm = capture_and_annotate(Step(), (torch.randn(8, 8), torch.randn(8, 4)))
    mesh = (2, 2)
    cost = CostModel(fxpar.preset("cpu-local", num_devices=4), mesh)
    strategies = all_strategies(gm, mesh)
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    # The ReLU as a rule that replicates over the second axis would have it; the dropout mask's
    # draw must be cut over both.
    strategies[relu] = [s for s in strategies[relu] if s.outputs[0][1] == R]
    simple = build_problem(gm, strategies, cost, simplify=True)
    cheap = {e for e in simple.edges if _is_cheap(e.producer) and _is_cheap(e.consumer)}
    assert simple.no_reshard < cheap
    sol = solve(simple)
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(simple.cost_of(sol.choice), rel=1e-12)
    for e in simple.no_reshard:
        assert e.out_specs[sol.choice[e.producer]] == e.in_specs[sol.choice[e.consumer]] or len(set(e.in_specs)) == 1 \
            or len(set(e.out_specs)) == 1
    simple.no_reshard = cheap
    with pytest.raises(Infeasible):
        solve(simple)
