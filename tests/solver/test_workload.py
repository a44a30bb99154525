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


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_large_batch_fast_links_is_data_parallel(wide_mlp, optimizer):
    gm = capture_and_annotate(wide_mlp, wide_mlp.example_inputs(8192))
    plan, _ = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8"), mesh_shape=(8,), optimizer=optimizer)
    # Data parallel: every forward matmul batch-split against the whole weight, each weight kept
    # replicated (DDP) or sharded and gathered for use (ZeRO-3, where the update it saves pays for
    # the gather); gradients all-reduced or reduce-scattered, never a weight split in a matmul.
    assert all(spec in ((R,), (Shard(0),)) for spec in plan.param_specs.values()), plan.param_specs
    forward = [(n, k) for n, k in _matmuls(gm, plan) if n.meta["fxpar_phase"] == "forward"]
    assert forward and all(k == "batch" for _, k in forward), forward
    outputs = gm.graph.output_node().args[0]
    for grad in outputs[1:]:
        assert plan.strategies[grad.name].outputs[0] in ((Partial(),), (R,), (Shard(0),))
    assert "all_reduce" in plan.explain()
    sharded = [name for name, spec in plan.param_specs.items() if spec != (R,)]
    if optimizer == "adam":
        # Adam's update (21 passes over a weight's bytes) is worth sharding every weight for.
        assert sharded == [name for name in plan.param_specs if name.endswith(".weight")]
    else:
        # SGD's is one pass: only the first layer's weight, whose gradient comes last and whose
        # synchronization nothing can hide (a reduce-scatter is half an all-reduce).
        assert sharded == ["layers.0.weight"]


def test_large_weights_small_batch_slow_links_is_megatron():
    # One transformer-style MLP block (a deeper stack would also shard its third weight).
    torch.manual_seed(0)
    block = MLP((1024, 4096, 1024))
    gm = capture_and_annotate(block, block.example_inputs(8))
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
    free, _ = plan_graph(gm, cluster=cluster, mesh_shape=(8,), optimizer="sgd")
    tight = cluster.with_memory(free.memory_bytes * 0.6)
    plan, _ = plan_graph(gm, cluster=tight, mesh_shape=(8,), optimizer="sgd")
    assert plan.memory_bytes <= tight.device.memory_bytes

    def sharded(p):
        return {name for name, spec in p.param_specs.items() if spec != (R,)}

    assert sharded(free) < sharded(plan)
    assert plan.predicted_step_s >= free.predicted_step_s * (1 - 1e-9)
