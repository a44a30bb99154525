"""The plans follow the workload on the shipped models (planned on the meta device)."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.errors import InfeasiblePlanError
from fxpar.models import GPT, AlexNet, GPTConfig
from fxpar.placement import R, Shard
from fxpar.plan import matmul_kind
from fxpar.planner import capture_and_annotate, plan_graph

aten = torch.ops.aten


def _alexnet_graph(batch: int):
    with torch.device("meta"):
        model = AlexNet(image_size=224)
        return capture_and_annotate(model, model.example_inputs(batch))


def _convs(gm):
    return [n for n in gm.graph.nodes if n.target == aten.convolution.default]


def test_alexnet_slow_links_modest_batch_is_one_weird_trick():
    gm = _alexnet_graph(128)
    plan, _ = plan_graph(gm, cluster=fxpar.preset("v100-pcie-4"), mesh_shape=(4,))
    # Convolutions: data parallel (batch-split activations, replicated weights).
    convs = _convs(gm)
    assert len(convs) == 5
    for conv in convs:
        assert plan.strategies[conv.name].outputs[0] == (Shard(0),), plan.strategies[conv.name].label()
    for name, spec in plan.param_specs.items():
        if name.startswith("features."):
            assert spec == (R,), (name, spec)
    # The two big fully connected layers (96% of the parameters): model parallel.
    for name in ("classifier.1.weight", "classifier.4.weight"):
        assert plan.param_specs[name] != (R,), (name, plan.param_specs[name])
    fc = [n for n in gm.graph.nodes if n.target == aten.addmm.default]
    assert {matmul_kind(n.target, plan.strategies[n.name], 0) for n in fc[:2]} <= {"column", "row"}


def test_alexnet_fast_links_large_batch_is_data_parallel():
    gm = _alexnet_graph(8192)
    # With SGD the update is one cheap pass over each weight: plain DDP.
    plan, _ = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8"), mesh_shape=(8,), optimizer="sgd")
    assert all(spec == (R,) for spec in plan.param_specs.values()), plan.param_specs
    for conv in _convs(gm):
        assert plan.strategies[conv.name].outputs[0] == (Shard(0),)
    forward_mm = [n for n in gm.graph.nodes if n.target == aten.addmm.default]
    assert all(matmul_kind(n.target, plan.strategies[n.name], 0) == "batch" for n in forward_mm)


def test_alexnet_adam_update_shards_the_fully_connected_weights_zero_style():
    """Adam's update reads and writes each weight and its two states (21 passes over the bytes):
    a replicated weight is updated whole on all 8 devices, a sharded one in eighths. The fully
    connected weights (94% of AlexNet's parameters) are worth an all-gather in the forward pass and
    a reduce-scatter instead of an all-reduce; the convolution weights are not."""
    gm = _alexnet_graph(8192)
    cluster = fxpar.preset("a100-nvlink-8")
    plan, _ = plan_graph(gm, cluster=cluster, mesh_shape=(8,), optimizer="adam")
    for name, spec in plan.param_specs.items():
        if name.startswith("features."):
            assert spec == (R,), (name, spec)
    for name in ("classifier.1.weight", "classifier.4.weight", "classifier.6.weight"):
        assert plan.param_specs[name] == (Shard(0),), (name, plan.param_specs[name])
    forward_mm = [n for n in gm.graph.nodes if n.target == aten.addmm.default]
    assert all(matmul_kind(n.target, plan.strategies[n.name], 0) == "batch" for n in forward_mm)
    # Against plain DDP under the same model: the plan's update is what sharding saves.
    replicated = {name: "R" for name in plan.param_specs}
    ddp, _ = plan_graph(gm, cluster=cluster, mesh_shape=(8,), optimizer="adam", force=replicated)
    assert plan.predicted_step_s < ddp.predicted_step_s
    assert plan.solver["optimizer_s"] < ddp.solver["optimizer_s"]


def test_transformer_that_does_not_fit_under_data_parallelism(monkeypatch):
    # Only that no data-parallel plan fits is checked here, not the error's explanation of how much
    # memory one would need, whose search with recomputation takes 12 s on this graph.
    import fxpar.planner

    monkeypatch.setattr(fxpar.planner, "EXPLAIN_LIMIT_S", 1.0)
    cfg = GPTConfig(vocab_size=4096, seq_len=128, n_layer=2, n_head=8, d_model=512)
    with torch.device("meta"):
        model = GPT(cfg)
        gm = capture_and_annotate(model, model.example_inputs(16))
    base = fxpar.preset("a100-nvlink-8", num_devices=4)
    replicated = {name: "R" for name, _ in model.named_parameters()}
    ddp, _ = plan_graph(gm, cluster=base, mesh_shape=(4,), force=replicated)
    cluster = base.with_memory(ddp.memory_bytes * 0.5)
    with pytest.raises(InfeasiblePlanError):
        plan_graph(gm, cluster=cluster, mesh_shape=(4,), force=replicated)
    plan, _ = plan_graph(gm, cluster=cluster, mesh_shape=(4,))
    assert plan.memory_bytes <= cluster.device.memory_bytes
    assert any(spec != (R,) for spec in plan.param_specs.values())
    # Whichever of Megatron tensor parallelism or ZeRO sharding the cost model prefers: the plan is
    # never predicted slower than either, forced, where it fits.
    block_linear = [n for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith("weight") and p.dim() == 2]
    column = ("q_proj", "k_proj", "v_proj", ".fc.")
    megatron = {n: ("S(0)" if any(c in n for c in column) else "S(1)") for n in block_linear}
    zero = {n: "S(0)" for n, p in model.named_parameters() if p.shape[0] % 4 == 0}
    for force in (megatron, zero):
        try:
            alternative, _ = plan_graph(gm, cluster=cluster, mesh_shape=(4,), force=force)
        except InfeasiblePlanError:
            continue
        assert plan.predicted_step_s <= alternative.predicted_step_s * (1 + 1e-9)
