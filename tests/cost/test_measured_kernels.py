"""Kernels timed by signature (``fxpar.calibrate.kernel_calls`` / ``measure_kernels``), the
in-step collective latency, and the collectives of batch norm with global statistics."""

from __future__ import annotations

import copy
import json
import dataclasses
import operator

import pytest
import torch

import fxpar
from fxpar.calibrate import IN_STEP_BYTES, IN_STEP_COLLECTIVES, IN_STEP_LARGE_BYTES, build_profile, kernel_calls, measure_kernels, with_measured_kernels
from fxpar.cluster import Cluster, LinkSpec
from fxpar.cost import MEASURED_CLASSES, CostModel, collective_time, kernel_key, op_class
from fxpar.models import MLP
from fxpar.placement import local_shape
from fxpar.planner import capture_and_annotate
from fxpar.rules.registry import output_values
from fxpar.solve.strategies import node_strategies

aten = torch.ops.aten


class _Loss(torch.nn.Module):
    """``body`` followed by the mean of its output: a scalar loss to capture."""

    def __init__(self, *layers):
        super().__init__()
        self.body = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x).mean()


def _mlp_graph():
    torch.manual_seed(0)
    model = MLP((16, 32, 8))
    return capture_and_annotate(model, model.example_inputs(8))


def _kernel_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and not n.meta.get("fxpar_is_view")
            and op_class(n) in MEASURED_CLASSES]


def test_kernel_calls_run_each_strategy_at_its_local_shapes():
    gm = _mlp_graph()
    mesh = (2,)
    calls = kernel_calls(gm, mesh)
    timed = measure_kernels(calls, repeats=1)
    assert set(timed) == set(calls) and all(len(ts) == 1 and ts[0] > 0 for ts in timed.values())
    for node in _kernel_nodes(gm):
        for strategy in node_strategies(node, mesh):
            target, args = calls[kernel_key(node, strategy, mesh)]
            real = [torch.randn(a[1], dtype=a[2]) if isinstance(a, tuple) and a[:1] == ("tensor",) else a for a in args]
            out = target(*real)
            # The kernel run on those inputs makes the output the strategy gives this device.
            want = local_shape(tuple(output_values(node)[0].shape), strategy.outputs[0], mesh)
            assert tuple(out.shape) == tuple(want), (node.name, strategy.label())


def test_measured_kernels_price_their_nodes_and_only_those():
    gm = _mlp_graph()
    mesh = (2,)
    base = fxpar.preset("cpu-local")
    nodes = _kernel_nodes(gm)
    first = nodes[0]
    strategy = node_strategies(first, mesh)[0]
    key = kernel_key(first, strategy, mesh)
    measured = with_measured_kernels(base, [{key: [0.25, 0.125, 0.5]}, {key: [0.0625, 0.75, 0.25]}])
    # The slowest rank per repeat (0.25, 0.75, 0.5), their median.
    assert measured.device.measured_kernel_s == {key: 0.5}
    assert CostModel(measured, mesh).compute_time(first, strategy) == 0.5
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for s in node_strategies(node, mesh):
            if (node, s) != (first, strategy) and kernel_key(node, s, mesh) != key:
                assert CostModel(measured, mesh).compute_time(node, s) == CostModel(base, mesh).compute_time(node, s)
    assert Cluster.from_json(measured.to_json()) == measured
    bad = dataclasses.replace(measured.device, measured_kernel_s={key: -1.0})
    with pytest.raises(fxpar.ClusterSpecError, match=r"measured_kernel_s\[.*\] is -1.0; it must be positive"):
        dataclasses.replace(measured, device=bad)


def test_getitem_costs_nothing():
    torch.manual_seed(0)
    model = _Loss(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.MaxPool2d(2))
    gm = capture_and_annotate(model, (torch.randn(4, 3, 8, 8),))
    cm = CostModel(fxpar.preset("cpu-local"), (1,))
    items = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert items
    for node in items:
        for s in node_strategies(node, (1,)):
            assert cm.compute_time(node, s) == 0.0


def test_in_step_latency_adds_to_each_blocking_collective_and_batch_norm():
    torch.manual_seed(0)
    model = _Loss(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6))
    gm = capture_and_annotate(model, (torch.randn(4, 3, 8, 8),))
    mesh = (2,)
    base = fxpar.preset("cpu-local")
    link = base.links[0]
    late = dataclasses.replace(base, links=(dataclasses.replace(link, in_step_latency=1e-3),))
    assert Cluster.from_json(late.to_json()) == late
    cm0, cm1 = CostModel(base, mesh), CostModel(late, mesh)
    bn = {n.target: n for n in gm.graph.nodes
          if n.target in (aten._native_batch_norm_legit_functional.default, aten.native_batch_norm_backward.default)}
    assert len(bn) == 2
    fwd, bwd = bn[aten._native_batch_norm_legit_functional.default], bn[aten.native_batch_norm_backward.default]
    # Batch cut on the axis: forward all-gathers 2 x 6 float32 statistics from 2 devices; backward
    # all-reduces 2 x 6 sums (fxpar.rules.norm), each once, plus the in-step latency.
    for node, x_pos, kind, nbytes in ((fwd, 0, "all_gather", 2 * 6 * 4 * 2), (bwd, 1, "all_reduce", 2 * 6 * 4)):
        cut = [s for s in node_strategies(node, mesh) if s.inputs[x_pos][0] == fxpar.placement.Shard(0)]
        whole = [s for s in node_strategies(node, mesh) if s.inputs[x_pos][0] == fxpar.placement.R]
        assert cut and whole
        want = collective_time(kind, nbytes, 2, *link.figures(kind))
        assert cm0.batch_norm_stats_time(node, cut[0]) == pytest.approx(want)
        assert cm1.batch_norm_stats_time(node, cut[0]) == pytest.approx(want + 1e-3)
        assert cm1.batch_norm_stats_time(node, whole[0]) == 0.0
    x = torch.empty(4, 8)
    R, S0 = (fxpar.placement.R,), (fxpar.placement.Shard(0),)
    assert cm1.reshard_time(x, S0, R) == pytest.approx(cm0.reshard_time(x, S0, R) + 1e-3)  # one all-gather
    assert cm1.reshard_time(x, R, S0) == cm0.reshard_time(x, R, S0)  # a local slice: no collective
    with pytest.raises(fxpar.ClusterSpecError, match=r"in_step_latency is -1.0; it must be >= 0"):
        dataclasses.replace(base, links=(dataclasses.replace(link, in_step_latency=-1.0),))
    # At half the bandwidth in a step: a blocking collective's bytes take twice as long; a
    # collective issued before the step needs it (in_step=False) is priced as after a barrier.
    half = dataclasses.replace(late, links=(dataclasses.replace(late.links[0], in_step_bandwidth_ratio=0.5),))
    assert Cluster.from_json(half.to_json()) == half
    cm2 = CostModel(half, mesh)
    big = torch.empty(1024, 256)
    want = collective_time("all_gather", big.numel() * 4, 2, link.figures("all_gather")[0] / 2, link.figures("all_gather")[1]) + 1e-3
    assert cm2.collective_time("all_gather", big.numel() * 4, 0, in_step=True) == pytest.approx(want)
    assert cm2.reshard_time(big, S0, R) - cm1.reshard_time(big, S0, R) == pytest.approx(
        want - 1e-3 - collective_time("all_gather", big.numel() * 4, 2, *link.figures("all_gather")))
    assert cm2.reshard_time(big, S0, R, in_step=False) == cm0.reshard_time(big, S0, R, in_step=False)
    for bad in (0.0, 1.5):
        with pytest.raises(fxpar.ClusterSpecError, match=rf"links\[0\].in_step_bandwidth_ratio is {bad}; it must be in \(0, 1\]"):
            dataclasses.replace(base, links=(dataclasses.replace(link, in_step_bandwidth_ratio=bad),))


def test_profile_records_the_in_step_measurement():
    from .test_cluster import _synthetic_results

    alpha, bw, overhead = 30e-6, 1e9, 4e-6
    alone = collective_time("all_reduce", IN_STEP_BYTES, 2, bw, alpha) + overhead
    # After segments of three lengths, each in-step all-reduce adds its alpha-beta time, the op
    # overhead and 0.5, 2 or 3 ms of waiting: the profile records each and prices the median, 2 ms,
    # as the link's in-step latency (docs/cost-model.md).
    for r in (results := copy.deepcopy(_synthetic_results(alpha, bw, overhead))):
        r["in_step"] = {}
        for rows, wait, compute in ((16, 0.5e-3, 0.005), (64, 2e-3, 0.015), (256, 3e-3, 0.050)):
            r["in_step"][f"compute@{rows}"] = [compute] * 3
            r["in_step"][f"both@{rows}"] = [compute + IN_STEP_COLLECTIVES * (alone + wait)] * 3
    c = build_profile(results, name="synthetic", wall_s=1.0)
    in_step = c.extra["calibration"]["in_step"]
    assert [in_step[f"extra_per_collective@{r}"] for r in (16, 64, 256)] == pytest.approx([0.5e-3, 2e-3, 3e-3], rel=1e-6)
    assert in_step["extra_per_collective"] == pytest.approx(2e-3, rel=1e-6)
    assert c.links[0].in_step_latency == in_step["extra_per_collective"]
    assert c.links[0].in_step_bandwidth_ratio == 1.0 and "bandwidth_ratio" not in in_step  # no large all-reduces measured
    # The large all-reduces add the same latency and their bytes at a third of the bandwidth: the
    # fit recovers the ratio from the two sizes.
    alone_large = collective_time("all_reduce", IN_STEP_LARGE_BYTES, 2, bw, alpha) + overhead
    slow_large = collective_time("all_reduce", IN_STEP_LARGE_BYTES, 2, bw / 3, alpha) + overhead
    slow_small = collective_time("all_reduce", IN_STEP_BYTES, 2, bw / 3, alpha) + overhead
    for r in results:
        for rows, wait, compute in ((16, 0.5e-3, 0.005), (64, 2e-3, 0.015), (256, 3e-3, 0.050)):
            r["in_step"][f"both@{rows}"] = [compute + IN_STEP_COLLECTIVES * (slow_small + wait)] * 3
            r["in_step"][f"large@{rows}"] = [compute + IN_STEP_COLLECTIVES * (slow_large + wait)] * 3
    c = build_profile(results, name="synthetic", wall_s=1.0)
    in_step = c.extra["calibration"]["in_step"]
    assert in_step["extra_per_large_collective"] == pytest.approx(2e-3 + slow_large - alone_large, rel=1e-6)
    assert c.links[0].in_step_bandwidth_ratio == pytest.approx(1 / 3, rel=1e-6)
    assert c.links[0].in_step_latency == pytest.approx(2e-3 + slow_small - alone, rel=1e-6)
    assert isinstance(c.links[0], LinkSpec)
    # Measurements of one segment length (before the lengths were several) record theirs.
    for r in results:
        r["in_step"] = {"compute": [0.040] * 3, "both": [0.040 + IN_STEP_COLLECTIVES * (alone + 2e-3)] * 3}
    assert build_profile(results, name="one", wall_s=1.0).extra["calibration"]["in_step"]["extra_per_collective"] == pytest.approx(2e-3, rel=1e-6)
    assert build_profile(_synthetic_results(alpha, bw, overhead), name="old", wall_s=1.0).extra["calibration"]["in_step"] == {}


def test_per_device_statistics_price_no_batch_norm_collectives():
    """A graph planned for ``batch_norm="local"`` prices a cut batch norm at its kernel alone (the
    layer communicates nothing), and the plan says which statistics it was priced for."""
    torch.manual_seed(0)
    model = _Loss(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6))
    inputs = (torch.randn(4, 3, 8, 8),)
    base = fxpar.preset("cpu-local")
    late = dataclasses.replace(base, links=(dataclasses.replace(base.links[0], in_step_latency=1e-3),))
    graphs = {mode: capture_and_annotate(model, inputs, batch_norm=mode) for mode in ("global", "local")}
    cms = {mode: CostModel(late, (2,)) for mode in graphs}
    for target in (aten._native_batch_norm_legit_functional.default, aten.native_batch_norm_backward.default):
        nodes = {mode: next(n for n in gm.graph.nodes if n.target is target) for mode, gm in graphs.items()}
        x_pos = 0 if target is aten._native_batch_norm_legit_functional.default else 1
        cut = [s for s in node_strategies(nodes["global"], (2,)) if s.inputs[x_pos][0] == fxpar.placement.Shard(0)]
        assert cms["global"].batch_norm_stats_time(nodes["global"], cut[0]) > 1e-3
        assert cms["local"].batch_norm_stats_time(nodes["local"], cut[0]) == 0.0
        assert cms["global"].compute_time(nodes["global"], cut[0]) > cms["local"].compute_time(nodes["local"], cut[0])
    # Pin the batch norm's batch cut: the plan for local statistics is that much cheaper.
    bn = next(n for n in graphs["global"].graph.nodes if n.target is aten._native_batch_norm_legit_functional.default)
    cut = [s for s in node_strategies(bn, (2,)) if s.inputs[0][0] == fxpar.placement.Shard(0)][0]
    plans = {mode: fxpar.plan(model, inputs, cluster=late, mesh_shape=(2,), force={bn.name: cut.label()}, batch_norm=mode)
             for mode in ("global", "local")}
    assert plans["local"].predicted_step_s < plans["global"].predicted_step_s
    assert plans["local"].batch_norm == "local" and plans["global"].batch_norm == "global"
    assert fxpar.Plan.from_json(plans["local"].to_json()).batch_norm == "local"
    assert "batch_norm" not in json.loads(plans["global"].to_json())  # the default's text is unchanged
