"""Presets, JSON round trips of clusters and calibrated profiles, and the profile errors."""

from __future__ import annotations

import json

import pytest
import torch

import fxpar
from fxpar.calibrate import _fit_link, build_profile
from fxpar.cluster import OP_CLASSES, PRESETS, Cluster, DeviceSpec, LinkSpec
from fxpar.cost import collective_time

NAMES = ["cpu-local", "p100-nvlink-8", "v100-pcie-4", "v100-nvlink-8", "a100-nvlink-8", "h200-nvlink-8", "h100-2node-16"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_and_cite_a_source(name):
    c = fxpar.preset(name)
    assert Cluster.from_json(c.to_json()) == c
    assert c.source
    if name != "cpu-local":
        assert c.device.board_power_w > c.device.idle_power_w > 0


def test_existing_preset_names_and_two_node_topologies():
    assert set(NAMES) <= set(PRESETS)
    for name in ("h100-2node-16", "a100-2node-16"):
        c = fxpar.preset(name)
        # Between nodes (axis 0) InfiniBand is slower than NVLink within a node (axis 1).
        assert len(c.links) == 2 and c.links[0].bandwidth < c.links[1].bandwidth
        assert c.extra["devices_per_node"] == 8


def _synthetic_results(alpha: float, bw: float, overhead: float) -> list[dict]:
    """What two ranks' ``measure`` would return on an ideal machine with these figures."""
    kinds = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
    coll = {}
    for k in kinds:
        coll[k] = [(2, s, [collective_time(k, s, 2, bw, alpha) + overhead] * 3) for s in (256, 65536, 1 << 20)]
    compute = {
        "overhead": [(100, [100 * overhead] * 3)],
        "matmul": [(2e9, [2e9 / 50e9 + overhead] * 3), (1e9, [1e9 / 40e9 + overhead] * 3)],
        "convolution": [(1e9, [1e9 / 25e9 + overhead] * 3)],
        "elementwise": [(3e8, [3e8 / 10e9 + overhead] * 3), (2e8, [2e8 / 8e9 + overhead] * 3)],
        "reduction": [(1e8, [1e8 / 5e9 + overhead] * 3)],
    }
    # A matmul of 10 ms and an all-reduce of 4 ms that take 11 ms together: 3 of the 4 ms hide.
    overlap = {"compute": [0.010] * 3, "comm": [0.004] * 3, "both": [0.011] * 3}
    rank = {"compute": compute, "collectives": coll, "overlap": overlap, "threads": 1, "device": "cpu", "backend": "gloo"}
    return [rank, rank]


def test_fit_recovers_known_latency_and_bandwidth():
    for kind in ("all_reduce", "all_gather", "broadcast"):
        points = [(n, s, collective_time(kind, s, n, 2e9, 40e-6) + 5e-6) for n in (2, 3, 4) for s in (256, 1 << 16, 1 << 22)]
        bw, lat = _fit_link(points, kind, 5e-6)
        assert bw == pytest.approx(2e9, rel=1e-6) and lat == pytest.approx(40e-6, rel=1e-6)


def test_profile_from_measurements():
    c = build_profile(_synthetic_results(30e-6, 1e9, 4e-6), name="synthetic", wall_s=1.0)
    d = c.device
    assert d.kernel_overhead_s == pytest.approx(4e-6)
    assert d.peak_flops == pytest.approx(50e9)  # the fastest kernel measured
    assert d.efficiencies("matmul")[0] == pytest.approx(45 / 50)  # median of 50 and 40 GFLOP/s
    assert d.efficiencies("convolution")[0] == pytest.approx(0.5)
    assert d.memory_bandwidth == pytest.approx(10e9)
    assert d.efficiencies("elementwise")[1] == pytest.approx(0.9)
    assert d.efficiencies("reduction")[1] == pytest.approx(0.5)
    assert d.overlap_efficiency == pytest.approx(0.75)
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        bw, lat = c.links[0].figures(kind)
        assert bw == pytest.approx(1e9, rel=1e-6) and lat == pytest.approx(30e-6, rel=1e-6)
    assert Cluster.from_json(c.to_json()) == c


def test_calibrated_profile_is_accepted_by_plan(tmp_path):
    c = build_profile(_synthetic_results(30e-6, 1e9, 4e-6), name="synthetic", wall_s=1.0)
    path = tmp_path / "p.json"
    c.save(path)
    loaded = fxpar.Cluster.load(path)
    assert loaded == c
    model = fxpar.models.MLP((16, 32, 4))
    plan = fxpar.plan(model, model.example_inputs(8), cluster=loaded, mesh_shape=(2,))
    assert plan.cluster == c and plan.predicted_step_s > 0
    assert fxpar.Plan.from_json(plan.to_json()).cluster == c


def _device(**kw) -> DeviceSpec:
    return DeviceSpec(**{"name": "d", "peak_flops": 1e12, "memory_bytes": 1e9, "memory_bandwidth": 1e11, **kw})


def test_bad_profiles_are_refused():
    link = LinkSpec(1e9, 1e-6)
    with pytest.raises(fxpar.ClusterSpecError, match=r"compute_efficiency_by_class has unknown keys \['gemm'\]; known: \['matmul'"):
        Cluster("c", _device(compute_efficiency_by_class={"gemm": 0.5}), 2, (link,))
    with pytest.raises(fxpar.ClusterSpecError, match=r"memory_efficiency_by_class\['reduction'\] is 0; it must be in \(0, 10\]"):
        Cluster("c", _device(memory_efficiency_by_class={"reduction": 0}), 2, (link,))
    with pytest.raises(fxpar.ClusterSpecError, match=r"links\[0\].bandwidth_by_collective has unknown keys \['allreduce'\]"):
        Cluster("c", _device(), 2, (LinkSpec(1e9, 1e-6, {"allreduce": 1e9}),))
    with pytest.raises(fxpar.ClusterSpecError, match=r"links\[0\].latency is -1e-06; it must be >= 0"):
        Cluster("c", _device(), 2, (LinkSpec(1e9, -1e-6),))
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.overlap_efficiency is 1.5; it must be in \[0, 1\]"):
        Cluster("c", _device(overlap_efficiency=1.5), 2, (link,))
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.kernel_overhead_s is nan; it must be >= 0"):
        Cluster("c", _device(kernel_overhead_s=float("nan")), 2, (link,))
    bad = json.loads(fxpar.preset("cpu-local").to_json())
    bad["device"]["compute_efficiency_by_class"] = ["matmul"]
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.compute_efficiency_by_class is \['matmul'\] \(a list\); it must be an object of numbers"):
        Cluster.from_json(json.dumps(bad))
    assert set(OP_CLASSES) == {"matmul", "convolution", "elementwise", "reduction"}


def test_missing_profile_file(tmp_path):
    with pytest.raises(fxpar.ClusterSpecError, match=r"cannot read cluster profile .*nope.json.*python -m fxpar calibrate --out PATH"):
        fxpar.Cluster.load(tmp_path / "nope.json")


def test_calibrate_needs_two_ranks(capsys):
    from fxpar.__main__ import main

    for argv, message in [(["calibrate", "--max-ranks", "1"], "--max-ranks is 1; collectives need at least 2 ranks"),
                          (["calibrate", "--quantile", "2"], "--quantile is 2.0; give a fraction in [0, 1]")]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert f"fxpar: error: ClusterSpecError: {message}" in capsys.readouterr().err


def test_profile_quantile_picks_from_the_slowest_rank():
    results = _synthetic_results(30e-6, 1e9, 4e-6)
    # Rank 1 is slow on the second of three repeats of the 2 GFLOP matmul; per repeat the slowest
    # rank counts: [0.04, 0.08, 0.04] + overhead.
    fast = results[0]["compute"]["matmul"][0][1]
    slow = [fast[0], 2 * fast[1], fast[2]]
    results = [results[0], {**results[1], "compute": {**results[1]["compute"], "matmul": [(2e9, slow), results[1]["compute"]["matmul"][1]]}}]
    median = build_profile(results, name="m", wall_s=1.0)
    assert median.device.peak_flops == pytest.approx(50e9)
    lowest = build_profile(results, name="q", wall_s=1.0, quantile=0.0)
    assert lowest.device.peak_flops == pytest.approx(50e9)
    highest = build_profile(results, name="q", wall_s=1.0, quantile=1.0)
    # The slow repeat makes the first matmul 25 GFLOP/s; the 40 GFLOP/s one is now the fastest.
    slow_rate = 2e9 / (2 * fast[1] - 4e-6)
    assert slow_rate == pytest.approx(25e9, rel=1e-3)
    assert highest.device.peak_flops == pytest.approx(40e9)
    assert highest.device.efficiencies("matmul")[0] == pytest.approx((slow_rate + 40e9) / 2 / 40e9)
    assert highest.extra["calibration"]["quantile"] == 1.0


def _preset_dict() -> dict:
    return json.loads(fxpar.preset("cpu-local").to_json())


def _set(path: str, value):
    def edit(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        d[last] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set("device.compute_efficiency", 5.0),
     r"cluster 'cpu-local': device.compute_efficiency is 5.0; it must be in \(0, 1\], the achievable fraction of peak_flops"),
    (_set("device.compute_efficiency", 0), r"device.compute_efficiency is 0; it must be in \(0, 1\]"),
    (_set("device.memory_efficiency", 50.0), r"device.memory_efficiency is 50.0; it must be in \(0, 10\]"),
    (_set("num_devices", 2.7), r"num_devices is 2.7 \(a float\); it must be a whole number, e.g. 8"),
    (_set("num_devices", "2"), r"num_devices is '2' \(a str\); it must be a whole number"),
    (_set("num_devices", 0), r"num_devices is 0; it must be a whole number >= 1"),
    (_set("device.peak_flops", "50e9"), r"device.peak_flops is '50e9' \(a str\); it must be a number"),
    (_set("device.peak_flops", True), r"device.peak_flops is True \(a bool\); it must be a number"),
    (_set("device.peak_flop", 5e10), r"device has unknown keys \['peak_flop'\]; known keys: \[.*'peak_flops'.*\] \(check the spelling\)"),
    (lambda d: d["device"].pop("memory_bytes"), r"device lacks the required keys \['memory_bytes'\]"),
    (lambda d: d.pop("links"), r"the top level lacks the required keys \['links'\]"),
    (_set("links", []), r"links is \[\] \(a list\); it must be a non-empty list of links"),
    (_set("links", {"bandwidth": 1e9}), r"links is .* \(a dict\); it must be a non-empty list of links"),
    (_set("links.0.latency", None), r"links\[0\].latency is None \(a NoneType\); it must be a number"),
    (_set("links.0.bandwidth_by_collective", {"all_reduce": "fast"}), r"links\[0\].bandwidth_by_collective\['all_reduce'\] is 'fast'"),
    (_set("name", 3), r"name is 3 \(a int\); it must be a string"),
    (_set("extra", []), r"extra is \[\] \(a list\); it must be an object"),
])
def test_cluster_file_is_checked_field_by_field(tmp_path, edit, match):
    d = _preset_dict()
    edit(d)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(d))
    with pytest.raises(fxpar.ClusterSpecError, match=r"cluster file '.*profile.json': .*" + match):
        Cluster.load(path)


def test_cluster_file_that_is_not_a_cluster(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(fxpar.ClusterSpecError, match=r"cluster file '.*p.json' is not UTF-8 text \(byte 0x89 at offset 0\).*python -m fxpar calibrate --out PATH"):
        Cluster.load(path)
    path.write_text('{"device": ' * 100000 + "1" + "}" * 100000)
    with pytest.raises(fxpar.ClusterSpecError, match=r"cluster file '.*p.json' nests too deeply to be a cluster description"):
        Cluster.load(path)
    path.write_text('{"name": "x",')
    with pytest.raises(fxpar.ClusterSpecError, match=r"cluster file '.*p.json' is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 14"):
        Cluster.load(path)
    path.write_text("[]")
    with pytest.raises(fxpar.ClusterSpecError, match=r"cluster file '.*p.json': the top level is \[\] \(a list\); it must be an object with the keys"):
        Cluster.load(path)


def test_counts_and_efficiencies_checked_without_json():
    with pytest.raises(fxpar.ClusterSpecError, match=r"cluster 'cpu-local': num_devices is 2.7; it must be a whole number >= 1"):
        fxpar.preset("cpu-local", num_devices=2.7)
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.compute_efficiency is 5.0; it must be in \(0, 1\]"):
        Cluster("c", _device(compute_efficiency=5.0), 2, (LinkSpec(1e9, 1e-6),))
    # A whole number written as a float is still a count.
    d = _preset_dict()
    d["num_devices"] = 4.0
    assert Cluster.from_json(json.dumps(d)).num_devices == 4


def test_dgx1_tf2017_ring_follows_the_cube_mesh():
    from collections import Counter

    from fxpar.cluster import DGX1_NVLINK_PAIRS, NVLINK1_ONE_LINK, PCIE3, dgx1_tf2017

    # A P100 has four NVLinks (datasheet): each GPU of the cube mesh has four neighbours, three in
    # its quad and GPU i +/- 4 (nvidia-smi topo -m of a DGX-1: GPU0 NV1 to GPU1-4, PHB to GPU5-7).
    degree = Counter(g for pair in DGX1_NVLINK_PAIRS for g in pair)
    assert dict(degree) == {g: 4 for g in range(8)}
    assert frozenset((0, 4)) in DGX1_NVLINK_PAIRS and frozenset((3, 4)) not in DGX1_NVLINK_PAIRS
    # Rings in device order: 0-1 and 0-1-2-3 stay on NVLink, 0-..-7 crosses PCIe at 3-4 and 7-0.
    for k, link in ((2, NVLINK1_ONE_LINK), (4, NVLINK1_ONE_LINK), (8, PCIE3)):
        c = dgx1_tf2017(k)
        assert c.num_devices == k and c.links[0].bandwidth == link.bandwidth
        assert c.device.overlap_efficiency == 0.0
        assert Cluster.from_json(c.to_json()) == c
    assert NVLINK1_ONE_LINK.bandwidth == pytest.approx(PRESETS["p100-nvlink-8"].links[0].bandwidth / 4)
    for bad in (0, 9, 2.0, True):
        with pytest.raises(fxpar.ClusterSpecError, match=rf"num_devices is {bad!r}, give one of 1..8"):
            dgx1_tf2017(bad)


def test_optimizer_fit_recovers_a_line_and_the_profile_prices_the_update_with_it():
    """Two ranks time each optimizer's update at two parameter sizes; the profile holds the line
    through the slower rank's medians, and the cost model prices an update by it."""
    from fxpar.calibrate import _fit_optimizer
    from fxpar.cost import CostModel
    from fxpar.placement import R, Shard

    fixed, per_byte = 80e-6, 0.35e-9
    line = {name: [(b, [fixed * (i + 1) + per_byte * b] * 3) for b in (1024, 1 << 18)] for i, name in enumerate(("sgd", "adam"))}
    assert _fit_optimizer([(b, t[0]) for b, t in line["adam"]]) == pytest.approx((2 * fixed, per_byte), rel=1e-9)
    # A negative intercept (a machine faster on the larger size) is clamped: the line through 0.
    assert _fit_optimizer([(1000, 2e-6), (2000, 2e-6)]) == pytest.approx((2e-6, 0.0))
    assert _fit_optimizer([(1000, 1e-6), (2000, 3e-6)]) == pytest.approx((0.0, 7e-3 / 5e6))
    fast, slow = _synthetic_results(30e-6, 1e9, 4e-6)
    slow = {**slow, "optimizers": line}
    fast = {**fast, "optimizers": {k: [(b, [t * 0.5 for t in ts]) for b, ts in v] for k, v in line.items()}}
    c = build_profile([fast, slow], name="synthetic", wall_s=1.0)
    assert c.name == "synthetic"
    assert c.device.optimizer_param_s == pytest.approx({"sgd": fixed, "adam": 2 * fixed}, rel=1e-9)
    assert c.device.optimizer_byte_s == pytest.approx({"sgd": per_byte, "adam": per_byte}, rel=1e-9)
    assert Cluster.from_json(c.to_json()) == c
    w = torch.empty(256, 64)
    cm = CostModel(c.with_memory(1e9), (2,))
    assert cm.optimizer_time(w, (R,), "adam") == pytest.approx(2 * fixed + per_byte * w.numel() * 4, rel=1e-9)
    assert cm.optimizer_time(w, (Shard(0),), "adam") == pytest.approx(2 * fixed + per_byte * w.numel() * 2, rel=1e-9)
    # Not measured: the roofline of its kernels, as for a preset.
    assert cm.optimizer_time(w, (R,), "adamw") == pytest.approx(
        8 * cm.roofline(0.0, 21 * w.numel() * 4 / 8, "elementwise"), rel=1e-9)
    # Measurements from before the updates were timed build a profile without them.
    assert build_profile(_synthetic_results(30e-6, 1e9, 4e-6), name="old", wall_s=1.0).device.optimizer_param_s == {}
