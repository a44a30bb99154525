"""HiGHS (the default solver) against SCIP (the solver fxpar used before) on shipped models: both
prove an optimum, and the optima agree; HiGHS's reported bound is its plan's cost (gap 0)."""

from __future__ import annotations

import math

import pytest
import torch

import fxpar
from fxpar.cost import CostModel
from fxpar.models import GPT, MLP, GPTConfig, Llama, LlamaConfig
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.solve.ilp import solve
from fxpar.solve.problem import build_problem
from fxpar.solve.strategies import all_strategies


def _graph(name: str):
    torch.manual_seed(0)
    model = {
        "mlp": lambda: MLP((16, 64, 32, 8)),
        "small-mlp": lambda: MLP((16, 32, 8)),
        "gpt": lambda: GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, d_model=32, dropout=0.0)),
        "llama": lambda: Llama(LlamaConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                           ffn_hidden=64)),
    }[name]()
    return capture_and_annotate(model, model.example_inputs(8))


@pytest.mark.parametrize("name, mesh, simplify", [
    ("mlp", (2, 2), False),
    ("mlp", (2, 4), True),
    ("small-mlp", (2, 2, 2), True),
    ("gpt", (2,), True),
    ("llama", (2, 2), True),
])
def test_highs_optimum_equals_scip_optimum(name, mesh, simplify):
    gm = _graph(name)
    cost = CostModel(fxpar.preset("a100-nvlink-8", num_devices=math.prod(mesh)), mesh)
    problem = build_problem(gm, all_strategies(gm, mesh), cost, simplify=simplify)
    new = solve(problem, solver="HIGHS")
    old = solve(problem, solver="SCIP")
    assert new.status == old.status == "optimal"
    assert new.objective == pytest.approx(old.objective, rel=1e-9)
    assert new.objective == pytest.approx(problem.cost_of(new.choice), rel=1e-12)
    assert new.gap <= 1e-9 and new.bound == pytest.approx(new.objective, rel=1e-9)


def test_a_3d_mesh_plans_optimally():
    gm = _graph("small-mlp")
    plan, problem = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8"), mesh_shape=(2, 2, 2))
    assert plan.solver["status"] == "optimal" and plan.solver["gap"] <= 1e-9
    assert plan.mesh_shape == (2, 2, 2)
    for spec in plan.param_specs.values():
        assert len(spec) == 3
    assert plan.predicted_step_s == pytest.approx(problem.cost_of(
        {n: problem.strategies[n].index(s) for n, s in plan.assignment(gm).items()}), rel=1e-12)


def test_highs_options_travel_in_the_solver_name():
    gm = _graph("mlp")
    mesh = (2, 2)
    cost = CostModel(fxpar.preset("a100-nvlink-8", num_devices=4), mesh)
    problem = build_problem(gm, all_strategies(gm, mesh), cost, simplify=False)
    plain = solve(problem, solver="HIGHS")
    no_presolve = solve(problem, solver="HIGHS:presolve=off,mip_rel_gap=0")
    assert no_presolve.status == plain.status == "optimal"
    assert no_presolve.objective == pytest.approx(plain.objective, rel=1e-9)
    # The options reach HiGHS: one it does not know is refused by it.
    with pytest.raises(Exception, match="no_such_option"):
        solve(problem, solver="HIGHS:no_such_option=1", presolve=False)
    with pytest.raises(ValueError, match="'SCIP:presolve=off'"):
        solve(problem, solver="SCIP:presolve=off", presolve=False)
    with pytest.raises(ValueError, match="'presolve' is not name=value"):
        solve(problem, solver="HIGHS:presolve", presolve=False)
