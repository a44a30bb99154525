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
from fxpar.planner import capture_and_annotate
from fxpar.solve.ilp import solve
from fxpar.solve.problem import build_problem
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
