"""The in-step cost of a blocking collective (``LinkSpec.in_step_latency``): paid by the collectives
a step waits for between computations, not by those it can issue before it needs them (values made
from the parameters alone or from the batch alone)."""

from __future__ import annotations

import dataclasses

import pytest

import fxpar
from fxpar.cost import CostModel
from fxpar.models import MLP
from fxpar.placement import R, Shard
from fxpar.planner import capture_and_annotate
from fxpar.solve.problem import EarlyValue, GradValue, build_problem
from fxpar.solve.strategies import all_strategies

IN_STEP = 1e-3


@pytest.fixture(scope="module")
def problem():
    model = MLP((8, 16, 16, 4))
    gm = capture_and_annotate(model, model.example_inputs(8))
    base = fxpar.preset("cpu-local", num_devices=2)
    cluster = dataclasses.replace(base, links=(dataclasses.replace(base.links[0], in_step_latency=IN_STEP),))
    return build_problem(gm, all_strategies(gm, (2,)), CostModel(cluster, (2,)))


def _gather_cost(p, edge) -> float:
    """The edge's price of an all-gather along dim 0 (S(0) -> R), and the same without the in-step cost."""
    value = edge.tensor.value if isinstance(edge.tensor, EarlyValue) else edge.tensor
    return p.reshard_cost(edge.tensor, (Shard(0),), (R,)), p.cost_model.reshard_time(value, (Shard(0),), (R,), in_step=False)


def test_activations_pay_the_in_step_latency_and_parameters_and_the_batch_do_not(problem):
    p = problem
    edges = [e for e in p.edges if not isinstance(e.tensor, GradValue) and e.tensor.dim() >= 1]
    roles = {e: e.producer.meta.get("fxpar_role") for e in edges}
    early = [e for e in edges if isinstance(e.tensor, EarlyValue)]
    # Parameters and the batch (and what is made from either alone) are early; the layers' outputs are not.
    assert {roles[e] for e in early if e.producer.op == "placeholder"} == {"param", "input"}
    relu = [e for e in edges if "relu" in str(e.producer.target)]
    assert relu and not any(isinstance(e.tensor, EarlyValue) for e in relu)
    for e in relu:
        priced, bare = _gather_cost(p, e)
        assert priced == pytest.approx(bare + IN_STEP)
    for e in early:
        priced, bare = _gather_cost(p, e)
        assert priced == pytest.approx(bare)
