"""Convolutions priced by the algorithm cuDNN would run (DeviceSpec.convolution_algorithms "cudnn",
the GPU presets) against direct pricing (CPU, calibrated profiles); docs/cost-model.md."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fxpar
from fxpar.cluster import Cluster, DeviceSpec, LinkSpec
from fxpar.cost import CostModel
from fxpar.placement import R, Shard
from fxpar.planner import capture_and_annotate
from fxpar.rules.registry import OpStrategy

aten = torch.ops.aten

# P100 SXM2 datasheet (docs/hardware.md) and the GPU presets' default efficiencies and overhead.
P100_FP32, P100_HBM = 10.6e12, 732e9
CE, ME, OVERHEAD = 0.7, 0.8, 5e-6


class TwoConvs(torch.nn.Module):
    """A stem and the convolution under test, so that the latter's backward computes all three
    gradients (input, filter, bias)."""

    def __init__(self, c, k, size, stride=1, padding=1, dtype=torch.float32):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1, dtype=dtype)
        self.conv = torch.nn.Conv2d(c, k, size, stride=stride, padding=padding, dtype=dtype)

    def forward(self, x):
        return self.conv(F.relu(self.stem(x))).float().square().mean()


def _graph(c, k, size, hw, batch, stride=1, padding=1, dtype=torch.float32):
    with torch.device("meta"):
        model = TwoConvs(c, k, size, stride, padding, dtype)
        x = torch.randn(batch, 3, hw, hw, dtype=dtype)
    return capture_and_annotate(model, (x,))


def _nodes(gm):
    """(forward convolution under test, its backward) with replicated strategies on one device."""
    fwd = [n for n in gm.graph.nodes if n.target == aten.convolution.default][1]
    bwd = next(n for n in gm.graph.nodes if n.target == aten.convolution_backward.default and n.args[10][0])
    return fwd, bwd


def _rep(node):
    n_out = 1 if node.target == aten.convolution.default else 3  # (y) or (grad x, grad w, grad b)
    return OpStrategy(((R,),) * 3, ((R,),) * n_out)


def _direct(node, cm_cpu_like):
    return cm_cpu_like.compute_time(node, _rep(node))


def _as_direct(cluster: Cluster) -> Cluster:
    return replace(cluster, device=replace(cluster.device, convolution_algorithms="direct"))


def test_presets_say_how_their_convolutions_are_priced():
    assert fxpar.preset("cpu-local").device.convolution_algorithms == "direct"
    for name in ("p100-nvlink-8", "v100-pcie-4", "a100-nvlink-8", "h100-nvlink-8", "h200-nvlink-8"):
        assert fxpar.preset(name).device.convolution_algorithms == "cudnn"


def test_large_3x3_convolution_runs_non_fused_winograd_f4x4():
    # VGG-16's conv3 block: 256 -> 256 channels at 56x56, batch 64.
    gm = _graph(256, 256, 3, 56, 64)
    fwd, _ = _nodes(gm)
    p100 = fxpar.preset("p100-nvlink-8")
    choices = CostModel(p100, (1,)).conv_algorithms(fwd, _rep(fwd))
    assert [(p, a) for p, a, _ in choices] == [("forward", "winograd_nonfused")]
    # F(4x4, 3x3): 6x6 = 36 products per 4x4 output tile instead of 16 x 9 = 144.
    tiles, a2 = 64 * 14 * 14, 36
    direct_flops = 2 * 64 * 256 * 256 * 9 * 56 * 56
    gemm_flops = 2 * a2 * tiles * 256 * 256
    assert gemm_flops * 4 == direct_flops
    bw, peak = P100_HBM * ME, P100_FP32 * CE
    x = y = 64 * 256 * 56 * 56
    w = 256 * 256 * 9
    tx, tw, ty = a2 * tiles * 256, a2 * 256 * 256, a2 * tiles * 256
    expected = (
        (x + tx) * 4 / bw                              # input transform
        + (w + tw) * 4 / bw                            # filter transform
        + max(gemm_flops / peak, (tx + tw + ty) * 4 / bw)  # 36 batched matrix products
        + (ty + y) * 4 / bw                            # inverse transform
        + 4 * OVERHEAD
    )
    assert choices[0][2] == pytest.approx(expected, rel=1e-12)
    direct = _direct(fwd, CostModel(_as_direct(p100), (1,)))
    assert direct == pytest.approx(direct_flops / peak + OVERHEAD, rel=1e-9)
    assert expected < direct / 2  # and the node's price is the Winograd one
    assert CostModel(p100, (1,)).compute_time(fwd, _rep(fwd)) == pytest.approx(expected, rel=1e-12)


def test_few_channels_run_fused_winograd_f2x2():
    # VGG-16's conv1_2 (64 -> 64 at 224x224): the transforms' memory traffic makes the non-fused
    # algorithm slower than the fused F(2x2, 3x3) kernel, which moves only the direct kernel's bytes.
    gm = _graph(64, 64, 3, 224, 8)
    fwd, _ = _nodes(gm)
    p100 = fxpar.preset("p100-nvlink-8")
    (kind, algo, seconds), = CostModel(p100, (1,)).conv_algorithms(fwd, _rep(fwd))
    assert (kind, algo) == ("forward", "winograd")
    tiles = 8 * 112 * 112
    flops = 2 * 16 * tiles * 64 * 64 + tiles * (32 * 64 + 24 * 64) + 28 * 64 * 64  # Lavin & Gray's transform counts
    nbytes = (8 * 64 * 224 * 224 * 2 + 64 * 64 * 9 + 64) * 4
    assert seconds == pytest.approx(max(flops / (P100_FP32 * CE), nbytes / (P100_HBM * ME)) + OVERHEAD, rel=1e-12)


def test_backward_is_one_call_per_gradient():
    gm = _graph(256, 256, 3, 28, 32)
    _, bwd = _nodes(gm)
    cm = CostModel(fxpar.preset("p100-nvlink-8"), (1,))
    choices = cm.conv_algorithms(bwd, _rep(bwd))
    assert [p for p, _, _ in choices] == ["backward_data", "backward_filter", "backward_bias"]
    assert all(a.startswith("winograd") for _, a, _ in choices[:2]) and choices[2][1] == "reduction"
    assert cm.compute_time(bwd, _rep(bwd)) == pytest.approx(sum(s for _, _, s in choices), rel=1e-12)
    # The stem's backward has no input gradient (the images need none): no backward_data call.
    stem_bwd = next(n for n in gm.graph.nodes if n.target == aten.convolution_backward.default and not n.args[10][0])
    assert [p for p, _, _ in cm.conv_algorithms(stem_bwd, _rep(stem_bwd))] == ["backward_filter", "backward_bias"]


@pytest.mark.parametrize("size, stride, padding", [(11, 4, 2), (3, 2, 1), (1, 1, 0), (7, 1, 3)])
def test_shapes_without_winograd_run_implicit_gemm_at_the_direct_price(size, stride, padding):
    gm = _graph(64, 128, size, 56, 16, stride=stride, padding=padding)
    fwd, _ = _nodes(gm)
    p100 = fxpar.preset("p100-nvlink-8")
    (kind, algo, seconds), = CostModel(p100, (1,)).conv_algorithms(fwd, _rep(fwd))
    assert (kind, algo) == ("forward", "implicit_gemm")
    assert seconds == pytest.approx(_direct(fwd, CostModel(_as_direct(p100), (1,))), rel=1e-12)


def test_cpu_keeps_direct_pricing():
    gm = _graph(256, 256, 3, 56, 64)
    fwd, _ = _nodes(gm)
    cpu = fxpar.preset("cpu-local")
    t = CostModel(cpu, (1,)).compute_time(fwd, _rep(fwd))
    flops = 2 * 64 * 256 * 256 * 9 * 56 * 56
    assert fwd.meta["fxpar_flops"] == flops
    assert t == pytest.approx(flops / (cpu.device.peak_flops * cpu.device.compute_efficiency) + cpu.device.kernel_overhead_s)


def test_tf32_tensor_cores_beat_winograd_and_bfloat16_has_none():
    gm = _graph(256, 256, 3, 56, 64)
    fwd, _ = _nodes(gm)
    a100 = fxpar.preset("a100-nvlink-8")
    # TF32 convolutions (torch's default) at 156 TFLOP/s beat Winograd on the 19.5 TFLOP/s FP32 units.
    assert CostModel(a100, (1,), tf32=frozenset({"convolution"})).conv_algorithms(fwd, _rep(fwd))[0][1] == "implicit_gemm"
    assert CostModel(a100, (1,), tf32=frozenset()).conv_algorithms(fwd, _rep(fwd))[0][1] == "winograd_nonfused"
    gm16 = _graph(256, 256, 3, 56, 64, dtype=torch.bfloat16)
    fwd16, _ = _nodes(gm16)
    assert CostModel(a100, (1,)).conv_algorithms(fwd16, _rep(fwd16))[0][1] == "implicit_gemm"


def test_a_batch_split_divides_the_winograd_time_by_about_the_devices():
    gm = _graph(256, 256, 3, 56, 64)
    fwd, _ = _nodes(gm)
    p100 = fxpar.preset("p100-nvlink-8")
    dp = OpStrategy(((Shard(0),), (R,), (R,)), ((Shard(0),),))
    one = CostModel(p100, (1,)).compute_time(fwd, _rep(fwd))
    eight = CostModel(p100, (8,)).compute_time(fwd, dp)
    assert one / 8 < eight < one / 7


def test_the_field_round_trips_and_is_checked():
    c = fxpar.preset("p100-nvlink-8")
    assert Cluster.from_json(c.to_json()) == c
    old = json.loads(c.to_json())
    del old["device"]["convolution_algorithms"]  # a description written before the field existed
    assert Cluster.from_json(json.dumps(old)).device.convolution_algorithms == "direct"
    dev = DeviceSpec("d", 1e12, 1e9, 1e11, convolution_algorithms="winograd")
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.convolution_algorithms is 'winograd'; it must be one of \['direct', 'cudnn'\]"):
        Cluster("c", dev, 2, (LinkSpec(1e9, 1e-6),))
