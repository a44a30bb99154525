"""Per-dtype peak FLOP/s: the preset figures, pricing by the dtype a node computes in, TF32 from
torch's settings at plan time, the cluster JSON field and its errors, calibration's figures."""

from __future__ import annotations

import json

import pytest
import torch

import fxpar
from fxpar.calibrate import build_profile
from fxpar.cluster import PEAK_DTYPES, Cluster, DeviceSpec, LinkSpec
from fxpar.cost import CostModel, op_class, tf32_classes
from fxpar.models import MLP
from fxpar.placement import R
from fxpar.planner import capture_and_annotate
from fxpar.rules.registry import OpStrategy
from tests.cost.test_cluster import _synthetic_results

aten = torch.ops.aten

# Dense figures of the NVIDIA H100 SXM5 datasheet / Hopper whitepaper (docs/hardware.md), FLOP/s.
H100_FP32, H100_TF32, H100_BF16 = 66.9e12, 494.7e12, 989.4e12
H100_HBM = 3350e9
# The preset's device-wide defaults: fraction of peak FLOP/s, of HBM bandwidth; per-op overhead.
CE, ME, OVERHEAD = 0.7, 0.8, 5e-6


def test_gpu_presets_carry_their_datasheet_dtype_peaks():
    h100 = fxpar.preset("h100-nvlink-8").device
    assert h100.peak_flops == pytest.approx(H100_FP32)
    assert h100.peak_flops_for(torch.float32) == pytest.approx(H100_FP32)
    assert h100.peak_flops_for("tf32") == pytest.approx(H100_TF32)
    assert h100.peak_flops_for(torch.bfloat16) == pytest.approx(H100_BF16)
    assert h100.peak_flops_for(torch.float16) == pytest.approx(H100_BF16)
    a100 = fxpar.preset("a100-nvlink-8").device
    assert (a100.peak_flops_for("tf32"), a100.peak_flops_for(torch.bfloat16)) == pytest.approx((156e12, 312e12))
    # V100 has FP16 tensor cores but no BF16 or TF32: those fall back to the FP32 peak.
    v100 = fxpar.preset("v100-nvlink-8").device
    assert v100.peak_flops_for(torch.float16) == pytest.approx(125e12)
    assert v100.peak_flops_for(torch.bfloat16) == v100.peak_flops_for("tf32") == v100.peak_flops
    # The CPU preset has no per-dtype figures; a dtype without a figure (integers) uses peak_flops.
    cpu = fxpar.preset("cpu-local").device
    assert cpu.peak_flops_by_dtype == {}
    assert cpu.peak_flops_for(torch.bfloat16) == cpu.peak_flops_for(torch.int64) == cpu.peak_flops
    for name in ("p100-nvlink-8", "v100-pcie-4", "a100-nvlink-8", "h100-nvlink-8", "h200-nvlink-8"):
        peaks = fxpar.preset(name).device.peak_flops_by_dtype
        assert peaks and set(peaks) <= set(PEAK_DTYPES)


def _mlp(dtype: torch.dtype, widths=(1024, 1024, 16), batch=1024):
    torch.manual_seed(0)
    model = MLP(widths).to(dtype)
    x, y = model.example_inputs(batch)
    return model, (x.to(dtype), y)


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


@pytest.fixture(scope="module")
def graphs():
    return {dtype: capture_and_annotate(*_mlp(dtype)) for dtype in (torch.float32, torch.bfloat16)}


def test_bf16_matmul_is_priced_at_the_bf16_peak(graphs):
    addmm = _node(graphs[torch.bfloat16], aten.addmm.default)  # bias [1024], x [1024, 1024], w^T [1024, 1024]
    assert addmm.meta["val"].dtype == torch.bfloat16
    rep = OpStrategy(((R,), (R,), (R,)), ((R,),))
    cm = CostModel(fxpar.preset("h100-nvlink-8"), (1,), tf32=frozenset())
    flops = 2 * 1024 * 1024 * 1024
    nbytes = 2 * (1024 + 3 * 1024 * 1024)  # two bytes an element
    flop_s, byte_s = flops / (H100_BF16 * CE), nbytes / (H100_HBM * ME)
    assert flop_s > byte_s  # compute-bound, so the peak decides
    assert cm.compute_time(addmm, rep) == pytest.approx(flop_s + OVERHEAD, rel=1e-12)


class _Autocast(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1024, 1024)

    def forward(self, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.linear(x)
        return (h.float() - y).pow(2).mean()


def test_autocast_matmul_is_priced_at_the_bf16_peak():
    # float32 parameters and inputs; autocast casts them, and the captured addmm runs on bfloat16.
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gm = capture_and_annotate(_Autocast(), (x, y))
    addmm = _node(gm, aten.addmm.default)
    assert [a.meta["val"].dtype for a in addmm.args] == [torch.bfloat16] * 3
    cm = CostModel(fxpar.preset("h100-nvlink-8"), (1,), tf32=frozenset({"matmul"}))
    flops = 2 * 1024 * 1024 * 1024
    t = cm.compute_time(addmm, OpStrategy(((R,), (R,), (R,)), ((R,),)))
    assert t == pytest.approx(flops / (H100_BF16 * CE) + OVERHEAD, rel=1e-12)


def test_fp32_matmul_unchanged_and_tf32_when_torch_allows_it(graphs):
    addmm = _node(graphs[torch.float32], aten.addmm.default)
    rep = OpStrategy(((R,), (R,), (R,)), ((R,),))
    h100 = fxpar.preset("h100-nvlink-8")
    flops = 2 * 1024 * 1024 * 1024
    nbytes = 4 * (1024 + 3 * 1024 * 1024)
    assert flops / (H100_TF32 * CE) > nbytes / (H100_HBM * ME)  # compute-bound even at the TF32 peak
    fp32 = CostModel(h100, (1,), tf32=frozenset()).compute_time(addmm, rep)
    assert fp32 == pytest.approx(flops / (H100_FP32 * CE) + OVERHEAD, rel=1e-12)
    tf32 = CostModel(h100, (1,), tf32=frozenset({"matmul"})).compute_time(addmm, rep)
    assert tf32 == pytest.approx(flops / (H100_TF32 * CE) + OVERHEAD, rel=1e-12)
    # TF32 convolutions do not make matmuls TF32.
    assert CostModel(h100, (1,), tf32=frozenset({"convolution"})).compute_time(addmm, rep) == fp32


def test_tf32_follows_torch_settings_when_the_model_is_built():
    h100 = fxpar.preset("h100-nvlink-8")
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
        assert tf32_classes() == {"convolution"}  # torch's defaults
        highest = CostModel(h100, (1,))
        for precision in ("high", "medium"):
            torch.set_float32_matmul_precision(precision)
            assert tf32_classes() == {"matmul", "convolution"}
        high = CostModel(h100, (1,))
        torch.backends.cudnn.allow_tf32 = False
        assert tf32_classes() == {"matmul"}
        torch.set_float32_matmul_precision("highest")
        assert tf32_classes() == frozenset()
        neither = CostModel(h100, (1,))
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    # Each model keeps the settings of its construction.
    assert highest.peak_flops(torch.float32, "matmul") == pytest.approx(H100_FP32)
    assert highest.peak_flops(torch.float32, "convolution") == pytest.approx(H100_TF32)
    assert high.peak_flops(torch.float32, "matmul") == pytest.approx(H100_TF32)
    assert neither.peak_flops(torch.float32, "convolution") == pytest.approx(H100_FP32)
    # TF32 concerns float32 only, and only the classes it is allowed for.
    assert high.peak_flops(torch.bfloat16, "matmul") == pytest.approx(H100_BF16)
    assert high.peak_flops(torch.float32, "elementwise") == pytest.approx(H100_FP32)
    assert high.peak_flops(None, "elementwise") == pytest.approx(H100_FP32)


def test_bytes_are_the_dtype_element_size(graphs):
    # relu is memory-bound: its time is its bytes over the bandwidth, two bytes an element in bfloat16.
    rep = OpStrategy(((R,),), ((R,),))
    cm = CostModel(fxpar.preset("h100-nvlink-8"), (1,))
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        relu = _node(graphs[dtype], aten.relu.default)  # [1024, 1024] in and out
        assert cm.compute_time(relu, rep) == pytest.approx(2 * 1024 * 1024 * size / (H100_HBM * ME) + OVERHEAD, rel=1e-12)


def _matmul_times(gm, plan, cm):
    """(sum over matmul nodes of their time less the overhead, sum over every node of its time)."""
    mm = total = 0.0
    for node in gm.graph.nodes:
        if node.name not in plan.strategies:
            continue
        t = cm.compute_time(node, plan.strategies[node.name])
        total += t
        if node.op == "call_function" and op_class(node) == "matmul":
            assert node.meta["fxpar_flops"] > 0
            mm += t - OVERHEAD
    return mm, total


def test_bf16_plan_compute_falls_by_the_matmul_peak_ratio():
    cluster = fxpar.preset("h100-nvlink-8")
    widths = (1024, 2048, 2048)  # every matmul large enough to be compute-bound in both dtypes
    plans, sums = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model, inputs = _mlp(dtype, widths)
        plans[dtype] = fxpar.plan(model, inputs, cluster=cluster, mesh_shape=(1,))
        gm = capture_and_annotate(model, inputs)
        cm = CostModel(cluster, (1,))
        sums[dtype] = _matmul_times(gm, plans[dtype], cm)
        # The plan's compute time is the sum of its nodes' times and of its optimizer update.
        update = sum(cm.optimizer_time(p, plans[dtype].param_specs[name], "adam") for name, p in model.named_parameters())
        assert plans[dtype].solver["optimizer_s"] == pytest.approx(update, rel=1e-9)
        assert plans[dtype].compute_s == pytest.approx(sums[dtype][1] + update, rel=1e-9)
    # forward: 2 addmm; backward: 2 weight gradients, 1 input gradient (the first layer's input needs none).
    flops = 2 * 1024 * (1024 * 2048 + 2048 * 2048) * 3 - 2 * 1024 * 1024 * 2048
    mm32, mm16 = sums[torch.float32][0], sums[torch.bfloat16][0]
    # float32 matmuls run at the FP32 peak (torch's default matmul precision): FLOPs over the peak.
    assert torch.get_float32_matmul_precision() == "highest"
    assert mm32 == pytest.approx(flops / (H100_FP32 * CE), rel=1e-9)
    assert mm16 == pytest.approx(flops / (H100_BF16 * CE), rel=1e-9)
    assert mm32 / mm16 == pytest.approx(H100_BF16 / H100_FP32, rel=1e-9)
    # The whole step's compute falls by at least the matmuls' saving (the other nodes move half the bytes).
    drop = plans[torch.float32].compute_s - plans[torch.bfloat16].compute_s
    assert drop >= (mm32 - mm16) * (1 - 1e-9)
    assert drop < plans[torch.float32].compute_s


# --- the cluster JSON field ---


def _device(**kw) -> DeviceSpec:
    return DeviceSpec(**{"name": "d", "peak_flops": 1e12, "memory_bytes": 1e9, "memory_bandwidth": 1e11, **kw})


def test_dtype_peaks_round_trip_through_json(tmp_path):
    c = fxpar.preset("h100-nvlink-8")
    assert json.loads(c.to_json())["device"]["peak_flops_by_dtype"]["bfloat16"] == pytest.approx(H100_BF16)
    assert Cluster.from_json(c.to_json()) == c
    custom = Cluster("c", _device(peak_flops_by_dtype={"bfloat16": 4e12, "float64": 5e11}), 2, (LinkSpec(1e9, 1e-6),))
    path = tmp_path / "c.json"
    custom.save(path)
    loaded = Cluster.load(path)
    assert loaded == custom and loaded.device.peak_flops_for(torch.bfloat16) == 4e12
    # A description written before the field existed loads with no per-dtype figures.
    old = json.loads(custom.to_json())
    del old["device"]["peak_flops_by_dtype"]
    assert Cluster.from_json(json.dumps(old)).device.peak_flops_by_dtype == {}


@pytest.mark.parametrize("peaks, message", [
    ({"bf16": 1e15}, r"device.peak_flops_by_dtype has the key 'bf16'; known dtype names: \['float64', 'tf32', 'bfloat16', 'float16'\]"),
    ({"float32": 1e12}, r"device.peak_flops_by_dtype has the key 'float32'; the float32 figure is device.peak_flops: set that instead"),
    ({torch.bfloat16: 1e15}, r"device.peak_flops_by_dtype has the key torch.bfloat16 \(write 'bfloat16'\)"),
    ({"bfloat16": 0.0}, r"device.peak_flops_by_dtype\['bfloat16'\] is 0.0; it must be positive \(and finite\)"),
    ({"float16": -2.5}, r"device.peak_flops_by_dtype\['float16'\] is -2.5; it must be positive"),
    ({"tf32": float("inf")}, r"device.peak_flops_by_dtype\['tf32'\] is inf; it must be positive \(and finite\)"),
    ([("bfloat16", 5.0)], r"device.peak_flops_by_dtype is \[\('bfloat16', 5.0\)\] \(a list\); give a dict of FLOP/s by dtype name"),
])
def test_bad_dtype_peaks_are_refused(peaks, message):
    with pytest.raises(fxpar.ClusterSpecError, match=r"cluster 'c': " + message):
        Cluster("c", _device(peak_flops_by_dtype=peaks), 2, (LinkSpec(1e9, 1e-6),))


@pytest.mark.parametrize("value, message", [
    ({"bfloat16": "1e15"}, r"device.peak_flops_by_dtype\['bfloat16'\] is '1e15' \(a str\); it must be a number"),
    ({"bfloat16": True}, r"device.peak_flops_by_dtype\['bfloat16'\] is True \(a bool\); it must be a number"),
    ([989e12], r'device.peak_flops_by_dtype is \[989000000000000.0\] \(a list\); it must be an object of numbers, e.g. \{"bfloat16": 989.4e12\}'),
    ({"half": 1e14}, r"cluster JSON: cluster 'h100-nvlink-8': device.peak_flops_by_dtype has the key 'half'; known dtype names"),
    ({"bfloat16": -1}, r"cluster JSON: cluster 'h100-nvlink-8': device.peak_flops_by_dtype\['bfloat16'\] is -1; it must be positive"),
])
def test_bad_dtype_peaks_in_json_are_refused(value, message):
    data = json.loads(fxpar.preset("h100-nvlink-8").to_json())
    data["device"]["peak_flops_by_dtype"] = value
    with pytest.raises(fxpar.ClusterSpecError, match=message):
        Cluster.from_json(json.dumps(data))


def test_peak_for_an_unknown_dtype_name():
    with pytest.raises(fxpar.ClusterSpecError, match=r"no peak FLOP/s can be named 'bf16'; give a torch.dtype or one of \['float32', 'float64'"):
        _device().peak_flops_for("bf16")


# --- calibration ---


def test_calibration_scales_the_peak_by_the_measured_dtype_speed():
    results = _synthetic_results(30e-6, 1e9, 4e-6)
    overhead = 4e-6
    # The first float32 matmul (2 GFLOP) ran at 50 GFLOP/s; the same kernel in bfloat16 at 150 and in
    # float16 at 5: the peak (50 GFLOP/s) times 3 and times 0.1.
    compute = {**results[0]["compute"], "matmul_bfloat16": [(2e9, [2e9 / 150e9 + overhead] * 3)],
               "matmul_float16": [(2e9, [2e9 / 5e9 + overhead] * 3)]}
    rank = {**results[0], "compute": compute}
    d = build_profile([rank, rank], name="p", wall_s=1.0).device
    assert d.peak_flops == pytest.approx(50e9)
    assert d.peak_flops_by_dtype == pytest.approx({"bfloat16": 150e9, "float16": 5e9})
    # Measurements without them (an older run) leave the map empty: every dtype at peak_flops.
    assert build_profile(results, name="p", wall_s=1.0).device.peak_flops_by_dtype == {}

