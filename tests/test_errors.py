"""Every user-facing error: its type and that its message names what is wrong and the values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpar
from fxpar.models import MLP
from fxpar.errors import DuplicateRuleError
from fxpar.launch import RankError
from fxpar.rules import register_rule

from .runtime import train_fns


class CumsumModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        return F.cross_entropy(torch.cumsum(self.fc(x), dim=1), y)


class NoLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        return self.fc(x)


def _inputs(batch=8):
    return torch.randn(batch, 8), torch.randint(0, 4, (batch,))


def test_op_without_rule_names_node_and_op_when_strict():
    with pytest.raises(fxpar.UnsupportedOpError, match=r"%cumsum \(aten\.cumsum\.default\) has no sharding rule; register one"):
        fxpar.plan(CumsumModel(), _inputs(), mesh_shape=(2,), strict=True)


def test_op_without_rule_warns_with_its_cost_and_runs_replicated():
    with pytest.warns(fxpar.FallbackWarning, match=r"%cumsum \(aten\.cumsum\.default\) has no sharding rule and runs replicated on every device: [0-9.]+ us of compute per device plus [0-9.]+ us gathering"):
        plan = fxpar.plan(CumsumModel(), _inputs(), mesh_shape=(2,))
    assert plan.strategies["cumsum"].outputs[0] == (fxpar.placement.R,)
    assert "fallback: %cumsum" in plan.explain()


def test_mesh_that_does_not_divide_the_batch():
    model = MLP((8, 16, 4))
    with pytest.raises(fxpar.ShardingError, match=r"input\[0\] .*shape \[6, 8\].*batch dim 0 \(6\) is not divisible by the 4 devices of mesh \[4\]"):
        fxpar.plan(model, model.example_inputs(6), mesh_shape=(4,))


def test_cluster_whose_memory_no_plan_fits():
    model = MLP((8, 64, 4))
    cluster = fxpar.preset("cpu-local", num_devices=2).with_memory(1000)
    with pytest.raises(fxpar.InfeasiblePlanError, match=r"no plan fits: on mesh \[2\] the smallest plan needs .* GiB per device .* has 0\.00 GiB"):
        fxpar.plan(model, model.example_inputs(8), cluster=cluster, mesh_shape=(2,))


def test_model_without_scalar_loss():
    with pytest.raises(fxpar.CaptureError, match=r"must return a scalar floating-point loss, but returned a tensor of shape \(8, 4\)"):
        fxpar.plan(NoLoss(), _inputs(), mesh_shape=(2,))


class MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        x.mul_(2.0)
        return F.cross_entropy(self.fc(x), y)


def test_in_place_update_of_a_non_buffer_is_refused():
    with pytest.raises(fxpar.CaptureError, match=r"%mul_ \(aten\.mul_\.Tensor\) mutates a tensor in place that is not a module buffer"):
        fxpar.plan(MutatesInput(), _inputs(), mesh_shape=(2,))


def test_non_tensor_inputs():
    with pytest.raises(fxpar.CaptureError, match=r"example_inputs\[1\] is a int"):
        fxpar.plan(MLP((8, 4)), (torch.randn(4, 8), 3), mesh_shape=(2,))


def test_mesh_larger_than_cluster():
    model = MLP((8, 16, 4))
    with pytest.raises(fxpar.ClusterSpecError, match=r"mesh \[8\] needs 8 devices but cluster 'v100-pcie-4' has 4"):
        fxpar.plan(model, model.example_inputs(8), cluster=fxpar.preset("v100-pcie-4"), mesh_shape=(8,))


def test_link_levels_must_match_mesh():
    model = MLP((8, 16, 4))
    with pytest.raises(fxpar.ClusterSpecError, match=r"describes 2 link levels but the mesh has 3 axes"):
        fxpar.plan(model, model.example_inputs(8), cluster=fxpar.preset("h100-2node-16"), mesh_shape=(2, 2, 2))


def test_unknown_preset_and_bad_cluster_json():
    with pytest.raises(fxpar.ClusterSpecError, match=r"unknown cluster preset 'tpu'; known presets: \["):
        fxpar.preset("tpu")
    with pytest.raises(fxpar.ClusterSpecError, match=r"not a cluster description"):
        fxpar.Cluster.from_json('{"name": "x"}')
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.peak_flops is -1.0; it must be positive"):
        fxpar.Cluster("bad", fxpar.DeviceSpec("d", -1.0, 1e9, 1e9), 2, (fxpar.LinkSpec(1e9, 1e-6),))


def test_force_must_name_a_known_node_and_strategy():
    model = MLP((8, 16, 4))
    with pytest.raises(fxpar.ClusterSpecError, match=r"force names 'nope', which is neither a node nor a parameter"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), force={"nope": "R"})
    with pytest.raises(fxpar.ClusterSpecError, match=r"force\['layers.0.weight'\] = 'S\(5\)' is not a strategy of %params_1"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), force={"layers.0.weight": "S(5)"})


def test_plan_for_another_graph_is_refused():
    from fxpar.planner import capture_and_annotate

    a, b = MLP((8, 16, 4)), MLP((8, 16, 16, 4))
    plan = fxpar.plan(a, a.example_inputs(8), mesh_shape=(2,))
    with pytest.raises(fxpar.PlanMismatchError, match=r"does not match the captured graph: nodes without a strategy \["):
        plan.assignment(capture_and_annotate(b, b.example_inputs(8)))


def test_unknown_optimizer():
    model = MLP((8, 4))
    with pytest.raises(fxpar.ClusterSpecError, match=r"unknown optimizer 'lion'; known: \["):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), optimizer="lion")


def test_duplicate_rule_is_rejected():
    with pytest.raises(DuplicateRuleError, match=r"a sharding rule for aten.mm.default is already registered \(mm_rule\)"):
        register_rule(torch.ops.aten.mm.default)(lambda info: [])


def test_compile_without_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    model = MLP((8, 4))
    with pytest.raises(fxpar.ClusterSpecError, match=r"needs a torch.distributed process group: run under torchrun"):
        fxpar.compile(model, model.example_inputs(8))


def test_wrong_local_batch_at_run_time():
    with pytest.raises(RankError, match=r"input\[0\] on this rank has shape \[16, 16\] but the plan expects this rank's slice of the global batch, \[8, 16\]"):
        fxpar.launch(train_fns.pass_global_batch, 2)


def test_backend_mesh_must_cover_the_group():
    with pytest.raises(RankError, match=r"the fxpar backend runs every rank of the group \(2\), but mesh \[1\] has 1 devices"):
        fxpar.launch(train_fns.backend_with_smaller_mesh, 2)
