"""fxpar.profile_report: per-op predicted (the cost model) against measured (torch.profiler on real
gloo ranks) time for one plan, on a tiny MLP with the eager runtime."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.cost import CostModel
from fxpar.models import MLP
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.profile_report import COMMUNICATION, measure, node_signature, predicted_by_signature


def tiny_mlp():
    torch.manual_seed(0)
    model = MLP((32, 64, 64, 10))
    return model, tuple(model.example_inputs(16))


@pytest.fixture(scope="module")
def planned():
    model, inputs = tiny_mlp()
    gm = capture_and_annotate(model, inputs)
    cluster = fxpar.preset("cpu-local")
    plan, _ = plan_graph(gm, cluster=cluster, mesh_shape=(2,), optimizer="adam", time_limit_s=20)
    return gm, plan, cluster


def test_predicted_column_is_the_cost_model_of_the_nodes(planned):
    gm, plan, cluster = planned
    cm = CostModel(cluster, plan.mesh_shape)
    predicted = predicted_by_signature(gm, plan, cluster)
    expected: dict = {}
    for node in gm.graph.nodes:
        if node.name in plan.strategies and node.op == "call_function":
            t = cm.compute_time(node, plan.strategies[node.name])
            if hasattr(node.target, "_schema"):
                key = node_signature(node, plan.strategies[node.name], plan.mesh_shape)
                expected[key] = expected.get(key, 0.0) + t
    assert {k: v[2] for k, v in predicted.items()} == pytest.approx(expected)
    # Every priced node is in some row; their sum is the plan's compute time less the optimizer's
    # update (which runs after the step the profiler measures, and no node of the graph prices).
    assert plan.solver["optimizer_s"] > 0
    assert sum(v[2] for v in predicted.values()) == pytest.approx(plan.compute_s - plan.solver["optimizer_s"], rel=1e-6)
    assert any(k[0] == "aten::addmm" for k in predicted)


def test_measured_column_comes_from_the_profiler_on_two_ranks(planned):
    gm, plan, cluster = planned
    sig = measure(tiny_mlp, nprocs=2, cluster=cluster, plan=plan, steps=2)
    print(sig.table())
    report = sig.regroup("class")
    by_key = {r.key: r for r in report.rows}
    classes = {v[0] for v in predicted_by_signature(gm, plan, cluster).values()}
    assert classes >= {"matmul", "elementwise", "reduction"}
    # One row per op class present (and the communication row); each measured by the profiler.
    assert set(by_key) - {COMMUNICATION} == classes | ({r.key for r in report.rows if r.nodes == 0} - {COMMUNICATION})
    for klass in classes:
        row = by_key[klass]
        assert row.measured_s > 0 and row.calls > 0, row
        assert row.predicted_s == pytest.approx(sum(v[2] for v in predicted_by_signature(gm, plan, cluster).values()
                                                    if v[0] == klass))
    # Sorted by absolute error, largest first; the wall step time is measured too.
    errors = [abs(r.error_s) for r in report.rows]
    assert errors == sorted(errors, reverse=True)
    assert report.measured_step_s > 0
    assert "| class | class | graph nodes |" in report.table()
    # By signature, the matmuls keep their own rows, with profiler calls matching the graph's nodes.
    mm = [r for r in sig.rows if r.key.startswith("aten::addmm") and r.nodes > 0]
    assert mm and all(r.measured_s > 0 and r.calls == r.nodes for r in mm), mm


def test_compiled_step_is_measured_by_class_with_generated_kernels_as_fused(planned):
    from fxpar.runtime.codegen import cpp_compiler

    if cpp_compiler() is None:
        pytest.skip("Inductor on CPU needs a C++ compiler")
    gm, plan, cluster = planned
    report = measure(tiny_mlp, nprocs=2, cluster=cluster, plan=plan, steps=2, by="class", codegen="inductor")
    print(report.table())
    assert report.codegen == "inductor"
    by_key = {r.key: r for r in report.rows}
    predicted = predicted_by_signature(gm, plan, cluster)
    # The elementwise and reduction nodes are priced as one class against Inductor's kernels.
    fused = by_key["fused"]
    assert fused.predicted_s == pytest.approx(sum(v[2] for v in predicted.values() if v[0] in ("elementwise", "reduction")))
    assert fused.measured_s > 0 and fused.calls > 0
    # What is left in those classes is measured only: ops the runtime adds (autograd's accumulation).
    assert all(by_key[k].nodes == 0 and by_key[k].predicted_s == 0 for k in ("elementwise", "reduction") if k in by_key)
    # The library matmuls keep their own class; the collectives (functional, waited for) are measured.
    assert by_key["matmul"].measured_s > 0 and by_key["matmul"].nodes > 0
    # By signature, each matmul node's row is measured once per step (Inductor's out= buffer folded in).
    sig = report.regroup("signature")
    mm = [r for r in sig.rows if r.key.startswith(("aten::addmm", "aten::mm")) and r.nodes > 0]
    assert mm and all(r.calls == r.nodes for r in mm), mm
    assert by_key[COMMUNICATION].measured_s > 0
    assert "inductor runtime" in report.table() and "runtime (outside the ops)" in by_key


class _ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.bn(self.conv(x)).mean((2, 3)), y)


def test_batch_norm_statistics_are_predicted_in_the_communication_row():
    from fxpar.profile_report import predicted_collectives_in_ops

    model = _ConvBN()
    inputs = (torch.randn(8, 3, 6, 6), torch.randint(0, 8, (8,)))
    gm = capture_and_annotate(model, inputs)
    cluster = fxpar.preset("cpu-local")
    from fxpar.placement import Shard
    from fxpar.solve.strategies import node_strategies

    bn = next(n for n in gm.graph.nodes if n.target is torch.ops.aten._native_batch_norm_legit_functional.default)
    cut = next(s for s in node_strategies(bn, (2,)) if s.inputs[0] == (Shard(0),))
    plan, _ = plan_graph(gm, cluster=cluster, mesh_shape=(2,), force={bn.name: cut.label()}, time_limit_s=20)
    in_ops = predicted_collectives_in_ops(gm, plan, cluster)
    assert in_ops > 0  # the batch is cut: statistics gathered forward, summed backward
    per_node = sum(v[2] for v in predicted_by_signature(gm, plan, cluster).values())
    assert per_node + in_ops == pytest.approx(plan.compute_s - plan.solver["optimizer_s"], rel=1e-6)
