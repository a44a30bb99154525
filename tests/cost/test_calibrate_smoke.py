"""`python -m fxpar calibrate` end to end with tiny sizes: real gloo ranks, a loadable profile."""

from __future__ import annotations

import dataclasses
import math

import pytest

import fxpar
import fxpar.models
from fxpar.__main__ import main
from fxpar.calibrate import kernel_calls
from fxpar.cluster import COLLECTIVES, OP_CLASSES
from fxpar.planner import capture_and_annotate


def small_mlp():
    """A ``MODULE:FACTORY`` for ``calibrate --model``: the MLP planned below, its global batch."""
    model = fxpar.models.MLP((16, 32, 4))
    return model, model.example_inputs(8)


def test_quick_calibration_writes_a_profile_plan_accepts(tmp_path, capfd):
    path = tmp_path / "profile.json"
    main(["calibrate", "--quick", "--max-ranks", "2", "--out", str(path), "--name", "here",
          "--model", "tests.cost.test_calibrate_smoke:small_mlp"])
    out = capfd.readouterr().out
    # Progress while it runs (from the ranks), then the summary.
    for stage in ("per-op overhead", "matmul", "convolution", "memory bandwidth", "collectives on 2 ranks", "optimizer updates",
                  "gradient hand-over"):
        assert f"[calibrate] {stage}" in out
    assert "[calibrate] matmul 64x128 @ 128x128 in bfloat16" in out
    assert f"wrote {path}" in out
    c = fxpar.Cluster.load(path)
    assert c.name == "here" and c.num_devices == 2
    d = c.device
    assert set(d.peak_flops_by_dtype) == {"bfloat16", "float16"}
    for value in (d.peak_flops, d.memory_bandwidth, d.memory_bytes, d.kernel_overhead_s, *d.peak_flops_by_dtype.values()):
        assert math.isfinite(value) and value > 0
    for klass in OP_CLASSES:
        assert all(math.isfinite(e) and e > 0 for e in d.efficiencies(klass))
    for kind in COLLECTIVES:
        bw, lat = c.links[0].figures(kind)
        assert math.isfinite(bw) and bw > 0 and math.isfinite(lat) and lat >= 0
        assert [p["ranks"] for p in c.extra["calibration"]["collectives"][kind]] == [2, 2]
    # Each optimizer's update, timed on DTensor parameters, as a line per parameter and byte.
    assert set(d.optimizer_param_s) == set(d.optimizer_byte_s) == {"sgd", "sgd-momentum", "adam", "adamw"}
    assert all(math.isfinite(v) and v >= 0 for v in (*d.optimizer_param_s.values(), *d.optimizer_byte_s.values()))
    assert d.optimizer_param_s["adam"] > 0
    # The runtime's hand-over of each parameter's gradient, timed through the module's autograd function.
    assert math.isfinite(d.gradient_handoff_s) and d.gradient_handoff_s > 0
    assert c.extra["calibration"]["gradient_handoff_s"] == d.gradient_handoff_s
    # A blocking collective's in-step cost: the median over the segment lengths measured (one in
    # --quick), recorded and priced by the link.
    in_step = c.extra["calibration"]["in_step"]
    assert in_step["extra_per_collective"] == in_step["extra_per_collective@16"] >= 0
    assert c.links[0].in_step_latency == in_step["extra_per_collective"]
    assert fxpar.Cluster.from_json(c.to_json()) == c
    # --model: the MLP's matmul kernels, every per-device shape a strategy on 2 devices gives them.
    want = kernel_calls(capture_and_annotate(*small_mlp()), (2,))
    assert want and set(d.measured_kernel_s) == set(want)
    assert all(math.isfinite(v) and v > 0 for v in d.measured_kernel_s.values())
    assert f"{len(want)} matmul and convolution kernels timed by signature" in out
    model = fxpar.models.MLP((16, 32, 4))
    plan = fxpar.plan(model, model.example_inputs(8), cluster=c)
    assert plan.mesh_shape == (2,) and plan.predicted_step_s > 0
    # Priced once per trainable parameter (4 here), the same under every strategy: the plan is the
    # one of the profile without it, its predicted step longer by exactly that.
    assert plan.solver["gradient_handoff_s"] == pytest.approx(4 * d.gradient_handoff_s)
    without = dataclasses.replace(c, device=dataclasses.replace(d, gradient_handoff_s=0.0))
    other = fxpar.plan(model, model.example_inputs(8), cluster=without)
    assert other.strategies == plan.strategies
    assert plan.predicted_step_s == pytest.approx(other.predicted_step_s + 4 * d.gradient_handoff_s, rel=1e-9)
