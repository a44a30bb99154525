"""The cost formulas against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from fxpar.cluster import Cluster, DeviceSpec, LinkSpec
from fxpar.cost import CostModel, collective_time, op_class
from fxpar.models import MLP
from fxpar.placement import P, R, Shard
from fxpar.planner import capture_and_annotate
from fxpar.rules.registry import OpStrategy

aten = torch.ops.aten
GB = 1e9


def test_collective_formulas_by_hand():
    s, b, a = 1e6, 1e9, 1e-6
    # n = 4: ring all-reduce sends 2(n-1)/n of the data in 2(n-1) hops.
    assert collective_time("all_reduce", s, 4, b, a) == pytest.approx(6e-6 + 1.5e-3)
    assert collective_time("all_gather", s, 4, b, a) == pytest.approx(3e-6 + 0.75e-3)
    assert collective_time("reduce_scatter", s, 4, b, a) == pytest.approx(3e-6 + 0.75e-3)
    assert collective_time("all_to_all", s, 4, b, a) == pytest.approx(3e-6 + 0.75e-3)
    # Broadcast: a tree of ceil(log2 n) hops, the whole tensor once per link.
    assert collective_time("broadcast", s, 4, b, a) == pytest.approx(2e-6 + 1e-3)
    assert collective_time("broadcast", s, 5, b, a) == pytest.approx(3e-6 + 1e-3)
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        assert collective_time(kind, s, 1, b, a) == 0.0
    assert collective_time("chunk", s, 4, b, a) == 0.0


def _cluster(links=(LinkSpec(10 * GB, 2e-6),), **device) -> Cluster:
    spec = dict(name="d", peak_flops=1e12, memory_bytes=1e10, memory_bandwidth=1e11,
                compute_efficiency=0.5, memory_efficiency=0.25, kernel_overhead_s=1e-6)
    spec.update(device)
    return Cluster("c", DeviceSpec(**spec), 8, tuple(links))


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    model = MLP((64, 128, 32))
    return capture_and_annotate(model, model.example_inputs(16))


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


def test_matmul_roofline_compute_bound(graph):
    addmm = _node(graph, aten.addmm.default)  # bias [128], x [16, 64], w^T [64, 128] -> [16, 128]
    rep = OpStrategy(((R,), (R,), (R,)), ((R,),))
    cm = CostModel(_cluster(), (1,))
    flops = 2 * 16 * 64 * 128
    nbytes = 4 * (128 + 16 * 64 + 64 * 128 + 16 * 128)
    expect = max(flops / (1e12 * 0.5), nbytes / (1e11 * 0.25)) + 1e-6
    assert cm.compute_time(addmm, rep) == pytest.approx(expect)
    # A per-class efficiency overrides the device-wide one for matmuls only.
    cm2 = CostModel(_cluster(peak_flops=1e9, compute_efficiency_by_class={"matmul": 0.1}), (1,))
    assert cm2.compute_time(addmm, rep) == pytest.approx(flops / (1e9 * 0.1) + 1e-6)
    # Batch-split over 2 devices: half the FLOPs and half of x and of the output per device.
    batch = OpStrategy(((R,), (Shard(0),), (R,)), ((Shard(0),),))
    cm3 = CostModel(_cluster(peak_flops=1e9), (2,))
    assert cm3.compute_time(addmm, batch) == pytest.approx(flops / 2 / (1e9 * 0.5) + 1e-6)


def test_elementwise_is_memory_bound_with_its_class_efficiency(graph):
    relu = _node(graph, aten.relu.default)  # [16, 128] -> [16, 128]
    rep = OpStrategy(((R,),), ((R,),))
    nbytes = 2 * 4 * 16 * 128
    cm = CostModel(_cluster(memory_efficiency_by_class={"elementwise": 0.5, "reduction": 0.01}), (1,))
    assert op_class(relu) == "elementwise"
    assert cm.compute_time(relu, rep) == pytest.approx(nbytes / (1e11 * 0.5) + 1e-6)
    views = [n for n in graph.graph.nodes if n.target == aten.t.default]
    assert views and all(cm.compute_time(v, OpStrategy(((R,),), ((R,),))) == 0.0 for v in views)


def test_op_classes(graph):
    classes = {str(n.target): op_class(n) for n in graph.graph.nodes if n.op == "call_function"}
    assert classes["aten.addmm.default"] == "matmul"
    assert classes["aten.mm.default"] == "matmul"
    assert classes["aten.relu.default"] == "elementwise"
    assert classes["aten._log_softmax.default"] == "reduction"
    assert any(k.startswith("aten.sum") and v == "reduction" for k, v in classes.items())


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)), y)


def test_op_classes_of_a_conv_net():
    gm = capture_and_annotate(_ConvNet(), (torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))))
    classes = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            classes.setdefault(n.target.overloadpacket.__name__ if hasattr(n.target, "overloadpacket") else str(n.target), op_class(n))
    assert classes["convolution"] == "convolution" and classes["convolution_backward"] == "convolution"
    norms = {k: v for k, v in classes.items() if "batch_norm" in k}
    assert norms and set(norms.values()) == {"reduction"}, norms


def test_reshard_times_by_hand():
    t = torch.empty(64, 256)  # 65536 bytes
    size = 64 * 256 * 4
    link = LinkSpec(10 * GB, 2e-6)
    cm = CostModel(_cluster((link,)), (4,))
    over = 1e-6
    # Partial -> Replicate: one all-reduce of the whole tensor, plus the step's kernel overhead.
    assert cm.reshard_time(t, (P,), (R,)) == pytest.approx(6 * 2e-6 + 1.5 * size / 1e10 + over)
    # Shard(0) -> Replicate: an all-gather to the full size (leading dim: no transposition).
    assert cm.reshard_time(t, (Shard(0),), (R,)) == pytest.approx(3 * 2e-6 + 0.75 * size / 1e10 + over)
    # Shard(1) -> Replicate: the same collective, plus moving dim 1 to the front and back: two
    # copies (read + write) of the shard and of the gathered tensor, at the elementwise bandwidth.
    copies = 2 * (size / 4 + size)
    expect = 3 * 2e-6 + 0.75 * size / 1e10 + max(0.0, copies / (1e11 * 0.25)) + over
    assert cm.reshard_time(t, (Shard(1),), (R,)) == pytest.approx(expect)
    # Partial -> Shard(0): a reduce-scatter of the full tensor.
    assert cm.reshard_time(t, (P,), (Shard(0),)) == pytest.approx(3 * 2e-6 + 0.75 * size / 1e10 + over)
    # Replicate -> Shard: a local slice, no communication.
    assert cm.reshard_time(t, (R,), (Shard(0),)) == pytest.approx(over)
    assert cm.reshard_time(t, (R,), (R,)) == 0.0


def test_each_mesh_axis_uses_its_own_link():
    t = torch.empty(64, 256)
    size = 64 * 256 * 4
    nodes, gpus = LinkSpec(1 * GB, 10e-6), LinkSpec(100 * GB, 1e-6)
    cm = CostModel(_cluster((nodes, gpus)), (2, 4))
    over = 1e-6
    # Gradient sync of a replicated tensor over both axes: inner axis first, then the outer one.
    inner = 2 * 3 * 1e-6 + 2 * 3 / 4 * size / 100e9
    outer = 2 * 1 * 10e-6 + 2 * 1 / 2 * size / 1e9
    assert cm.reshard_time(t, (P, P), (R, R)) == pytest.approx(inner + outer + 2 * over)
    assert cm.reshard_time(t, (R, P), (R, R)) == pytest.approx(inner + over)
    assert cm.reshard_time(t, (P, R), (R, R)) == pytest.approx(outer + over)


def test_per_collective_link_figures():
    t = torch.empty(1024)
    size = 4096
    link = LinkSpec(10 * GB, 2e-6, bandwidth_by_collective={"all_gather": 1 * GB}, latency_by_collective={"all_gather": 50e-6})
    cm = CostModel(_cluster((link,)), (2,))
    assert link.figures("all_gather") == (1 * GB, 50e-6) and link.figures("all_reduce") == (10 * GB, 2e-6)
    assert cm.reshard_time(t, (Shard(0),), (R,)) == pytest.approx(50e-6 + 0.5 * size / 1e9 + 1e-6)
    assert cm.reshard_time(t, (P,), (R,)) == pytest.approx(2 * 2e-6 + size / 1e10 + 1e-6)
    assert cm.collective_time("broadcast", size, 0) == pytest.approx(2e-6 + size / 1e10)


def test_optimizer_time_and_bytes_per_device():
    w = torch.empty(128, 64)
    cm = CostModel(_cluster(), (4,))
    size = 128 * 64 * 4
    assert cm.bytes_per_device(w, (Shard(0),)) == size // 4
    assert cm.bytes_per_device(w, (R,)) == size
    # Adam on a quarter of the weight: 7 elementwise kernels moving 19 shard-sized tensors in all.
    assert cm.optimizer_time(w, (Shard(1),), "adam") == pytest.approx(19 * size / 4 / (1e11 * 0.25) + 7e-6)
    # Plain SGD: one add_ reading the parameter and gradient and writing the parameter.
    assert cm.optimizer_time(w, (R,), "sgd") == pytest.approx(3 * size / (1e11 * 0.25) + 1e-6)
    assert math.isclose(cm.roofline(0.0, 0.0, "matmul"), 1e-6)
