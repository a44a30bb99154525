"""The solver follows the workload: known optima it must rediscover."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.models import MLP
from fxpar.placement import Partial, R, Shard
from fxpar.plan import matmul_kind
from fxpar.planner import capture_and_annotate, plan_graph

aten = torch.ops.aten


@pytest.fixture(scope="module")
def wide_mlp():
    torch.manual_seed(0)
    return MLP((1024, 4096, 4096, 1024))


def _matmuls(gm, plan):
    out = []
    for n in gm.graph.nodes:
        if n.target in (aten.mm.default, aten.addmm.default):
            out.append((n, matmul_kind(n.target, plan.strategies[n.name], 0)))
    return out


def test_large_batch_fast_links_is_data_parallel(wide_mlp):
    gm = capture_and_annotate(wide_mlp, wide_mlp.example_inputs(8192))
    plan, _ = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8"), mesh_shape=(8,))
    # DDP: replicated weights, every forward matmul batch-split, gradients all-reduced.
    assert all(spec == (R,) for spec in plan.param_specs.values()), plan.param_specs
    forward = [(n, k) for n, k in _matmuls(gm, plan) if n.meta["fxpar_phase"] == "forward"]
    assert forward and all(k == "batch" for _, k in forward), forward
    outputs = gm.graph.output_node().args[0]
    for grad in outputs[1:]:
        assert plan.strategies[grad.name].outputs[0] == (Partial(),) or plan.strategies[grad.name].outputs[0] == (R,)
    assert "all_reduce" in plan.explain()


def test_large_weights_small_batch_slow_links_is_megatron(wide_mlp):
    gm = capture_and_annotate(wide_mlp, wide_mlp.example_inputs(8))
    plan, _ = plan_graph(gm, cluster=fxpar.preset("v100-pcie-4"), mesh_shape=(4,))
    specs = plan.param_specs
    # Column-parallel first layer (weight [out, in] split on out), row-parallel second layer.
    assert specs["layers.0.weight"] == (Shard(0),)
    assert specs["layers.1.weight"] == (Shard(1),)
    first, second = [n for n in gm.graph.nodes if n.target == aten.addmm.default][:2]
    assert matmul_kind(first.target, plan.strategies[first.name], 0) == "column"
    assert matmul_kind(second.target, plan.strategies[second.name], 0) == "row"
    # Between the two matmuls the activation stays sharded: no collective inside the block ...
    relu = first.users and next(iter(first.users))
    assert plan.strategies[first.name].outputs[0] == (Shard(1),)
    assert plan.strategies[relu.name].inputs[0] == (Shard(1),) and plan.strategies[relu.name].outputs[0] == (Shard(1),)
    assert plan.strategies[second.name].inputs[1] == (Shard(1),)
    # ... and exactly one all-reduce after it: the row-parallel output is a Partial sum.
    assert plan.strategies[second.name].outputs[0] == (Partial(),)
    consumers = {plan.strategies[u.name].inputs[[a for a in u.all_input_nodes].index(second)] for u in second.users}
    assert consumers == {(R,)}


@pytest.mark.parametrize(
    "batch, cluster, force",
    [
        (8192, "a100-nvlink-8", {"layers.0.weight": "S(0)"}),
        (8192, "a100-nvlink-8", {"layers.1.weight": "S(1)", "layers.0.weight": "S(0)"}),
        (8, "v100-pcie-4", {"layers.0.weight": "R", "layers.1.weight": "R", "layers.2.weight": "R"}),
        (8, "v100-pcie-4", {"layers.1.weight": "S(0)"}),
    ],
)
def test_forcing_a_plan_away_never_beats_the_optimum(wide_mlp, batch, cluster, force):
    gm = capture_and_annotate(wide_mlp, wide_mlp.example_inputs(batch))
    best, _ = plan_graph(gm, cluster=fxpar.preset(cluster), mesh_shape=(4,))
    forced, _ = plan_graph(gm, cluster=fxpar.preset(cluster), mesh_shape=(4,), force=force)
    for key, want in force.items():
        assert repr(forced.param_specs[key][0]) == want
    assert forced.predicted_step_s >= best.predicted_step_s * (1 - 1e-9)


def test_tight_memory_shards_parameters_zero_style(wide_mlp):
    gm = capture_and_annotate(wide_mlp, wide_mlp.example_inputs(4096))
    cluster = fxpar.preset("a100-nvlink-8")
    free, _ = plan_graph(gm, cluster=cluster, mesh_shape=(8,))
    tight = cluster.with_memory(free.memory_bytes * 0.6)
    plan, _ = plan_graph(gm, cluster=tight, mesh_shape=(8,))
    assert plan.memory_bytes <= tight.device.memory_bytes
    assert any(spec != (R,) for spec in plan.param_specs.values())
    assert plan.predicted_step_s >= free.predicted_step_s * (1 - 1e-9)
