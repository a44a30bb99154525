"""Plan JSON is deterministic (sorted keys, rounded figures, no timings) and plans cache on disk by content."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

import fxpar
import fxpar.solve.ilp
from fxpar.models import MLP
from fxpar.plan import FIGURE_DIGITS, round_figure


def _model():
    model = MLP((16, 32, 32, 4))
    return model, model.example_inputs(8)


@pytest.fixture(scope="module")
def plans():
    model, inputs = _model()
    return [fxpar.plan(model, inputs, mesh_shape=(2, 2)) for _ in range(2)]


def test_planning_twice_gives_the_same_bytes(plans):
    a, b = plans
    assert a.to_json().encode() == b.to_json().encode()
    # The solver's timings are kept apart from the text, and differ from run to run.
    assert set(a.timings) == {"build_s", "solve_s"} and a.timings["solve_s"] > 0
    assert "solve_s" not in a.to_json() and "build_s" not in a.to_json()


def test_json_has_sorted_keys_and_rounded_figures(plans):
    plan = plans[0]
    text = plan.to_json()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True)
    d = json.loads(text)
    for key in ("predicted_step_s", "compute_s", "comm_s", "memory_bytes"):
        assert d[key] == float(f"{d[key]:.{FIGURE_DIGITS}g}")
    # Noise in the last digits of a figure does not change the text.
    noisy = dataclasses.replace(plan, predicted_step_s=math.nextafter(plan.predicted_step_s, math.inf),
                                comm_s=plan.comm_s * (1 + 1e-12), solver={**plan.solver, "solve_s": 123.0})
    assert noisy.to_json() == text
    assert round_figure(0.1234567891) == 0.123457 and round_figure(7) == 7 and round_figure("x") == "x"


def test_json_round_trips(plans):
    model, inputs = _model()
    plan = plans[0]
    again = fxpar.Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json() and again == plan
    assert again.strategies == plan.strategies and again.param_specs == plan.param_specs
    assert again.cluster == plan.cluster and again.mesh_shape == plan.mesh_shape
    assert again.timings == {}
    gm = fxpar.planner.capture_and_annotate(model, inputs)
    assert again.assignment(gm) == plan.assignment(gm)


def test_plan_cache_skips_the_solve(tmp_path, monkeypatch):
    model, inputs = _model()
    first = fxpar.plan(model, inputs, mesh_shape=(2,), plan_cache=tmp_path)
    entries = list(tmp_path.glob("plan-*.json"))
    assert len(entries) == 1 and entries[0].read_text() == first.to_json()

    def no_solve(*args, **kwargs):
        raise AssertionError("the solver ran although the plan is cached")

    monkeypatch.setattr(fxpar.solve.ilp, "solve", no_solve)
    monkeypatch.setattr(fxpar.planner, "solve", no_solve)
    again = fxpar.plan(model, inputs, mesh_shape=(2,), plan_cache=str(tmp_path))
    assert again.to_json() == first.to_json() and again.timings == {}
    assert "predicted step" in again.explain()
    # Anything the plan depends on is part of the key: these miss the cache and reach the solver.
    for kwargs in ({"mesh_shape": (2,), "optimizer": "sgd"}, {"mesh_shape": (2, 1)},
                   {"mesh_shape": (2,), "cluster": fxpar.preset("v100-pcie-4")},
                   {"mesh_shape": (2,), "force": {"layers.0.weight": "R"}}):
        with pytest.raises(AssertionError, match="the solver ran"):
            fxpar.plan(model, inputs, plan_cache=tmp_path, **kwargs)
    other = MLP((16, 32, 4))
    with pytest.raises(AssertionError, match="the solver ran"):
        fxpar.plan(other, other.example_inputs(8), mesh_shape=(2,), plan_cache=tmp_path)
    with pytest.raises(AssertionError, match="the solver ran"):
        fxpar.plan(model, model.example_inputs(16), mesh_shape=(2,), plan_cache=tmp_path)


def test_a_restarted_process_reads_the_cached_plan(tmp_path, monkeypatch):
    script = (
        "import sys, fxpar\n"
        "from fxpar.models import MLP\n"
        "model = MLP((16, 32, 32, 4))\n"
        "print(fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), plan_cache=sys.argv[1]).to_json())\n"
    )
    made = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)

    def no_solve(*args, **kwargs):
        raise AssertionError("the solver ran although the plan is cached")

    monkeypatch.setattr(fxpar.planner, "solve", no_solve)
    model, inputs = _model()
    assert fxpar.plan(model, inputs, mesh_shape=(2,), plan_cache=tmp_path).to_json() == made.stdout.strip()


def test_unreadable_cache_entry_is_made_again(tmp_path):
    model, inputs = _model()
    first = fxpar.plan(model, inputs, mesh_shape=(2,), plan_cache=tmp_path)
    (entry,) = tmp_path.glob("plan-*.json")
    entry.write_text(first.to_json()[:100])  # truncated, as by a crash mid-write
    again = fxpar.plan(model, inputs, mesh_shape=(2,), plan_cache=tmp_path)
    assert again.to_json() == first.to_json() == entry.read_text()
    assert set(again.timings) == {"build_s", "solve_s"}  # it was solved


def test_cached_plan_for_a_captured_graph(tmp_path):
    from fxpar.plan_cache import cache_key, cached_plan

    model, inputs = _model()
    gm = fxpar.planner.capture_and_annotate(model, inputs)
    plan = cached_plan(gm, plan_cache=tmp_path, mesh_shape=(2,))
    cluster, mesh = fxpar.planner.resolve_mesh(None, (2,))
    key = cache_key(gm, cluster=cluster, mesh=mesh, optimizer="adam", force=None, time_limit_s=60.0,
                    strict=False, simplify=True)
    assert (tmp_path / f"plan-{key}.json").read_text() == plan.to_json()
    # Capturing the same model again gives the same key.
    gm2 = fxpar.planner.capture_and_annotate(model, inputs)
    assert cache_key(gm2, cluster=cluster, mesh=mesh, optimizer="adam", force=None, time_limit_s=60.0,
                     strict=False, simplify=True) == key
    # recompute=False is another plan, and so are torch's TF32 settings (they change GPU prices).
    assert cache_key(gm2, cluster=cluster, mesh=mesh, optimizer="adam", force=None, time_limit_s=60.0,
                     strict=False, simplify=True, recompute=False) != key
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not old
        assert cache_key(gm2, cluster=cluster, mesh=mesh, optimizer="adam", force=None, time_limit_s=60.0,
                         strict=False, simplify=True) != key
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
