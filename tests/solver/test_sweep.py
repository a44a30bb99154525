"""The device-count sweep: Pareto front and objectives against brute force, exclusions, the energy
model against its formula, the command line."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxpar
from fxpar.energy import PowerModel, StepEnergy, step_energy
from fxpar.errors import ClusterSpecError, InfeasiblePlanError, ShardingError
from fxpar.models import MLP
from fxpar.sweep import (
    Objective,
    SweepError,
    SweepPoint,
    candidate_meshes,
    choose,
    fastest,
    least_energy,
    pareto_front,
    sweep,
    within_energy,
    within_slowdown,
)

DIMS = (1024, 4096, 4096, 10)  # big enough that more devices are faster but cost more energy
BATCH = 512


def meta_mlp(dims=DIMS, batch=BATCH):
    with torch.device("meta"):
        model = MLP(dims)
        return model, model.example_inputs(batch)


def point(step_s: float, joules: float, k: int, batch: int = 1) -> SweepPoint:
    return SweepPoint((k,), None, StepEnergy(k, step_s, step_s, 0.0, joules, batch))


def brute_front(points: list[SweepPoint]) -> list[SweepPoint]:
    """Points no other point dominates; of identical (time, energy) pairs the one with fewest
    devices, then the first."""
    out = []
    for i, p in enumerate(points):
        dominated = any(
            q.step_s <= p.step_s and q.joules_per_step <= p.joules_per_step
            and (q.step_s < p.step_s or q.joules_per_step < p.joules_per_step)
            for q in points
        )
        twin = any(
            (q.step_s, q.joules_per_step) == (p.step_s, p.joules_per_step) and (q.num_devices, j) < (p.num_devices, i)
            for j, q in enumerate(points)
        )
        if not dominated and not twin:
            out.append(p)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 8)), min_size=1, max_size=12))
def test_pareto_front_matches_brute_force(triples):
    points = [point(float(t), float(e), k) for t, e, k in triples]
    front = pareto_front(points)
    assert {id(p) for p in front} == {id(p) for p in brute_front(points)}
    assert [p.step_s for p in front] == sorted(p.step_s for p in front)


def test_each_objective_picks_the_right_point():
    a, b, c, d = point(1.0, 10.0, 8), point(1.04, 6.0, 4), point(1.2, 5.0, 2), point(2.0, 4.0, 1)
    dominated = point(1.5, 7.0, 3)
    points = [d, dominated, c, b, a]
    assert pareto_front(points) == [a, b, c, d]
    assert choose(points, fastest()) is a
    assert choose(points, least_energy()) is d
    assert choose(points, within_slowdown(0.05)) is b
    assert choose(points, within_slowdown(0.0)) is a
    assert choose(points, within_slowdown(0.25)) is c
    assert choose(points, within_energy(6.0)) is b
    assert choose(points, within_energy(5.5)) is c
    assert choose(points, within_energy(100.0)) is a
    with pytest.raises(SweepError, match=r"no configuration stays within 3 J/sample; the least is 4 J/sample on mesh \[1\]"):
        choose(points, within_energy(3.0))


def brute_choice(points: list[SweepPoint], kind: str, value: float | None = None) -> SweepPoint:
    ok = [p for p in points if p.feasible]
    if kind == "fastest":
        return min(ok, key=lambda p: (p.step_s, p.joules_per_step))
    if kind == "least-energy":
        return min(ok, key=lambda p: (p.joules_per_step, p.step_s))
    if kind == "slowdown":
        limit = min(p.step_s for p in ok) * (1 + value)
        return min((p for p in ok if p.step_s <= limit), key=lambda p: (p.joules_per_step, p.step_s))
    return min((p for p in ok if p.joules_per_sample <= value), key=lambda p: (p.step_s, p.joules_per_step))


@pytest.mark.parametrize("count_unused", [False, True], ids=["used-only", "count-unused"])
def test_sweep_matches_independent_plans(count_unused):
    cluster = fxpar.preset("p100-nvlink-8")
    busy, idle = 250.0, 40.0
    model, inputs = meta_mlp()
    power = PowerModel.of(cluster.device, busy_w=busy, idle_w=idle, count_unused=count_unused)
    result = sweep(model, inputs, cluster=cluster, power=power, objective=fastest())
    assert [p.mesh_shape for p in result.points] == [(k,) for k in range(1, 9)]
    for p in result.points:
        k = p.num_devices
        if BATCH % k:
            assert not p.feasible and f"not divisible by the {k} devices" in p.excluded
            continue
        # An independent plan (its own capture) and the energy formula written out.
        own_model, own_inputs = meta_mlp()
        plan = fxpar.plan(own_model, own_inputs, cluster=cluster, mesh_shape=(k,))
        want_j = k * busy * plan.predicted_step_s + (8 - k) * idle * plan.predicted_step_s * count_unused
        assert p.step_s == pytest.approx(plan.predicted_step_s, rel=1e-6)
        assert p.joules_per_step == pytest.approx(want_j, rel=1e-6)
        assert p.joules_per_sample == pytest.approx(want_j / BATCH, rel=1e-6)
        assert p.samples_per_s == pytest.approx(BATCH / plan.predicted_step_s, rel=1e-6)
    feasible = [p for p in result.points if p.feasible]
    assert [p.num_devices for p in feasible] == [1, 2, 4, 8]
    assert {id(p) for p in result.front} == {id(p) for p in brute_front(feasible)}
    assert len(result.front) >= 2, "the case should trade time for energy"
    mid_budget = sorted(p.joules_per_sample for p in feasible)[1]
    for objective, kind, value in [
        (fastest(), "fastest", None),
        (least_energy(), "least-energy", None),
        (within_slowdown(0.05), "slowdown", 0.05),
        (within_slowdown(1.0), "slowdown", 1.0),
        (within_energy(mid_budget), "energy-budget", mid_budget),
    ]:
        assert choose(result.points, objective) is brute_choice(feasible, kind, value), objective


def test_sweep_plans_equal_plans_of_fresh_captures_on_a_conv_net():
    """Capturing once must not change the plans: each mesh's plan is what a fresh capture gives, and
    it applies to a fresh capture (as fxpar.compile makes on every rank)."""
    from fxpar.models import AlexNet
    from fxpar.planner import capture_and_annotate

    def fresh():
        with torch.device("meta"):
            model = AlexNet(num_classes=10, image_size=32, width=0.25)
            return model, model.example_inputs(128)

    cluster = fxpar.preset("v100-pcie-4")
    result = sweep(*fresh(), cluster=cluster, optimizer="sgd")
    assert [p.num_devices for p in result.points if p.feasible] == [1, 2, 4]
    for p in result.points:
        if p.feasible:
            own = fxpar.plan(*fresh(), cluster=cluster, mesh_shape=p.mesh_shape, optimizer="sgd")
            assert p.plan.strategies == own.strategies, p.mesh_shape
            p.plan.assignment(capture_and_annotate(*fresh()))


def test_infeasible_device_counts_are_excluded_with_the_reason():
    model, inputs = meta_mlp()
    # About 0.40 GiB per device on one device and 0.21 on two (Adam): 0.15 GiB leaves 4 and 8.
    cluster = fxpar.preset("p100-nvlink-8").with_memory(0.15 * 2**30)
    result = sweep(model, inputs, cluster=cluster, objective=least_energy())
    by_k = {p.num_devices: p for p in result.points}
    for k in (1, 2):
        assert by_k[k].excluded.startswith("InfeasiblePlanError: no plan fits: on mesh")
        assert " MiB per device" in by_k[k].excluded
    assert by_k[3].excluded.startswith("ShardingError")
    assert [p.num_devices for p in result.points if p.feasible] == [4, 8]
    assert result.chosen.num_devices == 4
    table = result.table()
    assert "excluded [1]: InfeasiblePlanError" in table and "excluded [3]: ShardingError" in table
    with pytest.raises(InfeasiblePlanError, match="no mesh of cluster 'p100-nvlink-8' has a plan"):
        sweep(model, inputs, cluster=cluster.with_memory(2**20))


def test_two_level_cluster_sweeps_node_by_gpu_shapes():
    full = replace(fxpar.preset("h100-2node-16"), extra={})
    assert candidate_meshes(full, devices_per_node=8) == [(a, b) for a in (1, 2) for b in range(1, 9)]
    assert candidate_meshes(replace(full, extra={"devices_per_node": 4})) == [
        (a, b) for a in (1, 2, 3, 4) for b in range(1, 5)
    ]
    with pytest.raises(ClusterSpecError, match=r"number of devices per node is None.*--devices-per-node"):
        candidate_meshes(full)
    cluster = fxpar.preset("h100-2node-16", num_devices=4)
    model, inputs = meta_mlp((16, 64, 10), 64)
    result = sweep(model, inputs, cluster=cluster, devices_per_node=2, objective=fastest())
    assert [p.mesh_shape for p in result.points] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(p.feasible and p.plan.mesh_shape == p.mesh_shape for p in result.points)
    assert result.chosen is brute_choice(result.points, "fastest")


def test_step_energy_counts_idle_time_of_a_longer_measured_step():
    model, inputs = meta_mlp((64, 256, 10), 32)
    plan = fxpar.plan(model, inputs, cluster=fxpar.preset("v100-pcie-4"), mesh_shape=(2,))
    power = PowerModel(busy_w=200.0, idle_w=30.0, comm_w=100.0, count_unused=True)
    measured = 3 * plan.predicted_step_s
    e = step_energy(plan, 32, power, step_s=measured)
    per_device = plan.compute_s * 200 + plan.comm_s * 100 + (measured - plan.compute_s - plan.comm_s) * 30
    assert e.joules_per_step == pytest.approx(2 * per_device + 2 * measured * 30)
    assert e.average_power_w == pytest.approx(e.joules_per_step / measured)


def test_bad_objectives_and_power_figures_are_errors():
    with pytest.raises(SweepError, match="unknown objective 'cheapest'"):
        Objective("cheapest")
    with pytest.raises(SweepError, match=r"slowdown needs max_slowdown >= 0.*got -0.1"):
        within_slowdown(-0.1)
    with pytest.raises(SweepError, match="energy-budget needs max_joules_per_sample > 0"):
        within_energy(0)
    with pytest.raises(ClusterSpecError, match="'cpu-process' has no board power figure.*busy_w="):
        PowerModel.of(fxpar.preset("cpu-local").device)
    with pytest.raises(ClusterSpecError, match=r"idle_w \(90.0 W\) exceeds busy_w \(80.0 W\)"):
        PowerModel(busy_w=80.0, idle_w=90.0)
    with pytest.raises(ShardingError, match="not divisible by the 3 devices"):
        fxpar.plan(*meta_mlp((64, 10), 16), cluster=fxpar.preset("v100-pcie-4"), mesh_shape=(3,))


CLI = ["sweep", "--dims", "64,256,10", "--batch", "32", "--cluster", "v100-pcie-4"]


def test_command_prints_the_table(capsys):
    from fxpar.__main__ import main

    main([*CLI, "--objective", "fastest"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [1, 2, 4]  # 3 does not divide the batch
    assert sum("<--" in r for r in rows) == 1
    assert "excluded [3]: ShardingError" in out


def test_command_writes_a_plot(capsys, tmp_path):
    from fxpar.__main__ import main

    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    main([*CLI, "--plot", str(png)])
    assert f"plot written to {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_without_matplotlib_still_prints_the_table(capsys, monkeypatch, tmp_path):
    from fxpar.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        main([*CLI, "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "J/sample" in captured.out and "<--" in captured.out
    assert "matplotlib, which is not installed: pip install 'fxpar[viz]'" in captured.err
    assert not (tmp_path / "x.png").exists()


def test_sweep_considers_given_3d_meshes():
    """Meshes of three axes among the candidates: each point is the plan ``fxpar.plan`` makes on
    that mesh from a fresh capture, and the objective chooses among 1-, 2- and 3-D meshes alike."""
    cluster = fxpar.preset("p100-nvlink-8")
    meshes = [(2,), (2, 2, 2), (8,)]
    result = sweep(*meta_mlp(), cluster=cluster, meshes=meshes, objective=fastest())
    assert [p.mesh_shape for p in result.points] == meshes
    for p in result.points:
        plan = fxpar.plan(*meta_mlp(), cluster=cluster, mesh_shape=p.mesh_shape)
        assert p.feasible and p.step_s == pytest.approx(plan.predicted_step_s, rel=1e-6)
    assert choose(result.points, fastest()) is min(result.points, key=lambda p: p.step_s)
