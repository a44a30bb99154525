"""Every user-facing error: its type and that its message names what is wrong and the values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpar
from fxpar.models import MLP
from fxpar.errors import DuplicateRuleError, PlanFileError, PlanOptionError
from fxpar.launch import RankError
from fxpar.rules import register_rule

from .runtime import loop_fns, train_fns


class RenormModel(nn.Module):
    """Uses aten.renorm, an op with neither a rule of fxpar's own nor a DTensor strategy."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        return F.cross_entropy(torch.renorm(self.fc(x), 2, 0, 1.0), y)


class NoLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        return self.fc(x)


def _inputs(batch=8):
    return torch.randn(batch, 8), torch.randint(0, 4, (batch,))


def test_op_without_rule_names_node_and_op_when_strict():
    with pytest.raises(fxpar.UnsupportedOpError, match=r"%renorm \(aten\.renorm\.default\) has no sharding rule; register one"):
        fxpar.plan(RenormModel(), _inputs(), mesh_shape=(2,), strict=True)


def test_op_without_rule_warns_with_its_cost_and_runs_replicated():
    with pytest.warns(fxpar.FallbackWarning, match=r"%renorm \(aten\.renorm\.default\) has no sharding rule and runs replicated on every device: [0-9.]+ us of compute per device plus [0-9.]+ us gathering"):
        plan = fxpar.plan(RenormModel(), _inputs(), mesh_shape=(2,))
    assert plan.strategies["renorm"].outputs[0] == (fxpar.placement.R,)
    assert "fallback: %renorm" in plan.explain()


def test_mesh_that_does_not_divide_the_batch():
    model = MLP((8, 16, 4))
    with pytest.raises(fxpar.ShardingError, match=r"input\[0\] .*shape \[6, 8\].*batch dim 0 \(6\) is not divisible by the 4 devices of mesh \[4\]"):
        fxpar.plan(model, model.example_inputs(6), mesh_shape=(4,))


def test_cluster_whose_memory_no_plan_fits():
    model = MLP((8, 64, 4))
    cluster = fxpar.preset("cpu-local", num_devices=2).with_memory(1000)
    # Sizes print in the unit that fits them, never as "0.00 GiB".
    with pytest.raises(fxpar.InfeasiblePlanError, match=r"no plan fits: on mesh \[2\] the smallest plan needs [0-9.]+ KiB per device .* has 1000 B; use more devices"):
        fxpar.plan(model, model.example_inputs(8), cluster=cluster, mesh_shape=(2,))


@pytest.mark.parametrize("found", ["least found", "none found"])
def test_no_plan_fits_says_when_the_least_memory_with_recomputation_is_not_proven(monkeypatch, found):
    """Where the explanation's search for the least memory with recomputation stops at its limit
    (stood in for here: the search's own result, marked unproven), the message gives the least
    found as an upper bound and names the limit, or says that none was found."""
    import fxpar.planner

    real = fxpar.planner.min_memory_found

    def stopped(problem, **kwargs):
        assert kwargs["time_limit_s"] == fxpar.planner.EXPLAIN_LIMIT_S
        value, _ = real(problem, **kwargs)
        return (value if found == "least found" else float("nan")), False

    monkeypatch.setattr(fxpar.planner, "min_memory_found", stopped)
    model = MLP((8, 64, 4))
    cluster = fxpar.preset("cpu-local", num_devices=2).with_memory(1000)
    want = r"at most [0-9.]+ KiB \(the least found in 30 s\)" if found == "least found" else "an amount not found in time"
    with pytest.raises(fxpar.InfeasiblePlanError, match=rf"KiB per device \(parameters, gradients, adam state and live activations\), {want} with activations recomputed"):
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
    with pytest.raises(fxpar.CaptureError, match=r"%copy_ \(aten\.copy_\.default\) writes into input\[0\] in place during the step; fxpar updates only module buffers"):
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
    with pytest.raises(fxpar.ClusterSpecError, match=r"cluster JSON: the top level lacks the required keys \['device', 'num_devices', 'links'\]; write the file with"):
        fxpar.Cluster.from_json('{"name": "x"}')
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.peak_flops is -1.0; it must be positive"):
        fxpar.Cluster("bad", fxpar.DeviceSpec("d", -1.0, 1e9, 1e9), 2, (fxpar.LinkSpec(1e9, 1e-6),))
    link = (fxpar.LinkSpec(1e9, 1e-6),)
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.optimizer_param_s has unknown keys \['lamb'\]; known: \['sgd', 'sgd-momentum', 'adam', 'adamw'\]"):
        fxpar.Cluster("bad", fxpar.DeviceSpec("d", 1e12, 1e9, 1e9, optimizer_param_s={"lamb": 1e-5}, optimizer_byte_s={"lamb": 0.0}), 2, link)
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.optimizer_byte_s\['adam'\] is -1e-09; it must be"):
        fxpar.Cluster("bad", fxpar.DeviceSpec("d", 1e12, 1e9, 1e9, optimizer_param_s={"adam": 1e-5}, optimizer_byte_s={"adam": -1e-9}), 2, link)
    with pytest.raises(fxpar.ClusterSpecError, match=r"device.optimizer_param_s has \['adam'\] and device.optimizer_byte_s \[\]; give both figures for each optimizer"):
        fxpar.Cluster("bad", fxpar.DeviceSpec("d", 1e12, 1e9, 1e9, optimizer_param_s={"adam": 1e-5}), 2, link)


def test_force_must_name_a_known_node_and_strategy():
    model = MLP((8, 16, 4))
    with pytest.raises(PlanOptionError, match=r"force names 'nope', which is neither a node nor a parameter of the graph; parameters: \['layers.0.bias'"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), force={"nope": "R"})
    with pytest.raises(PlanOptionError, match=r"force\['layers.0.weight'\] = 'S\(5\)' is not a strategy of %params_1"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), force={"layers.0.weight": "S(5)"})


def test_plan_for_another_graph_is_refused():
    from fxpar.planner import capture_and_annotate

    a, b = MLP((8, 16, 4)), MLP((8, 16, 16, 4))
    plan = fxpar.plan(a, a.example_inputs(8), mesh_shape=(2,))
    with pytest.raises(fxpar.PlanMismatchError, match=r"does not match the captured graph: nodes without a strategy \["):
        plan.assignment(capture_and_annotate(b, b.example_inputs(8)))


def test_unknown_optimizer():
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=r"unknown optimizer 'lion'; known: \[.*optimizer='adamw' for torch.optim.AdamW"):
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


def test_unknown_input_placement():
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=r"input_placement='whole' is not one of \['shard', 'replicate'\]: 'shard' \(each rank passes its slice"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), input_placement="whole")


def test_slice_given_where_the_whole_batch_is_planned():
    with pytest.raises(RankError, match=r"input\[0\] on this rank has shape \[8, 16\] but the plan \(input_placement='replicate'\) expects the whole global batch, \[16, 16\], on every rank"):
        fxpar.launch(train_fns.pass_slice_with_whole_batch_placement, 2)


def test_plan_made_for_another_input_placement_is_refused():
    # Raised on every rank; a rank that learns it from rank 0 names it ("rank 0 failed checking ...").
    with pytest.raises(RankError, match=r"PlanMismatchError: (rank \d failed checking fxpar.compile's arguments: )?the plan was made for input_placement='replicate' but compile was given input_placement='shard'; pass input_placement='replicate'"):
        fxpar.launch(train_fns.compile_with_plan_of_other_placement, 2)


def test_calibrate_model_that_is_no_factory():
    from fxpar.calibrate import calibrate

    with pytest.raises(PlanOptionError, match=r"module 'fxpar.models' has no function 'no_such_model' \(from 'fxpar.models:no_such_model'\)"):
        calibrate(quick=True, models=["fxpar.models:no_such_model"])


def test_unknown_batch_norm_statistics_to_plan():
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=r"batch_norm='sync' is not one of \['global', 'local'\]: 'global' \(the whole batch's"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), batch_norm="sync")


def test_plan_priced_for_other_batch_norm_statistics_is_refused():
    with pytest.raises(RankError, match=r"PlanMismatchError: (rank \d failed checking fxpar.compile's arguments: )?the plan was priced for batch_norm='global' but compile was given batch_norm='local'; pass batch_norm='global' or plan again with fxpar.plan\(\.\.\., batch_norm='local'\)"):
        fxpar.launch(train_fns.compile_with_plan_of_other_batch_norm, 2)


def test_wrong_step_inputs_at_run_time():
    assert fxpar.launch(loop_fns.bad_step_inputs, 2) == [True, True]


def test_backend_mesh_must_cover_the_group():
    with pytest.raises(RankError, match=r"the fxpar backend runs every rank of the group \(2\), but mesh \[1\] has 1 devices"):
        fxpar.launch(train_fns.backend_with_smaller_mesh, 2)


# Arguments that are not cluster descriptions: PlanOptionError, raised before the model is captured.


@pytest.mark.parametrize("mesh_shape, match", [
    ((2.5,), r"mesh_shape \[2.5\]: axis 0 has size 2.5 \(a float\); every size must be a whole number >= 1"),
    ((2, True), r"mesh_shape \[2, True\]: axis 1 has size True \(a bool\)"),
    (("2",), r"mesh_shape \['2'\]: axis 0 has size '2' \(a str\)"),
    ((2, 0), r"axis 1 has size 0 \(a int\); every size must be a whole number >= 1"),
    (2, r"mesh_shape is 2 \(a int\); give a tuple of axis sizes, e.g. mesh_shape=\(2,\)"),
    ("2x2", r"mesh_shape is '2x2' \(a str\); give a tuple of axis sizes"),
    ((), r"mesh_shape is empty; give at least one axis size"),
])
def test_bad_mesh_shape(mesh_shape, match):
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=match):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=mesh_shape)


def test_cluster_that_is_not_a_cluster():
    assert fxpar.PlanOptionError is PlanOptionError and fxpar.PlanFileError is PlanFileError
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=r"cluster is 'a100-nvlink-8' \(a str\); give a fxpar.Cluster, e.g. fxpar.preset\("):
        fxpar.plan(model, model.example_inputs(8), cluster="a100-nvlink-8")
    with pytest.raises(PlanOptionError, match=r"give a cluster, a mesh_shape, or both"):
        fxpar.plan(model, model.example_inputs(8))


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "60", True, None])
def test_bad_time_limit(value):
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=r"time_limit_s is .*; give the solver's limit in seconds, a finite number > 0"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), time_limit_s=value)


def test_optimizer_of_the_wrong_type():
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=r"unknown optimizer <class 'torch.optim.adam.Adam'>; known: \['adam', 'adamw', 'sgd', 'sgd-momentum'\]"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), optimizer=torch.optim.Adam)


def test_force_of_the_wrong_type():
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=r"force is \[\('layers.0.weight', 'R'\)\] \(a list\); give a dict from parameter or node name"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), force=[("layers.0.weight", "R")])
    with pytest.raises(PlanOptionError, match=r"force has the entry 'layers.0.weight': 0; keys and values must be strings"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), force={"layers.0.weight": 0})


def test_plan_cache_that_is_not_a_directory(tmp_path):
    model = MLP((8, 4))
    with pytest.raises(PlanOptionError, match=r"plan_cache is 3 \(a int\); give the path of a directory"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), plan_cache=3)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(PlanOptionError, match=r"plan_cache '.*file' cannot be used as a directory: .*; give a writable directory"):
        fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,), plan_cache=afile)


# Data-dependent control flow in forward: a CaptureError naming the user's line.


class BranchesOnValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.fc(x)
        if h.sum() > 0:  # the line the error names
            h = h * 2
        return F.cross_entropy(h, y)


class MasksByValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.fc(x)
        keep = h[:, 0] > 0
        return F.cross_entropy(h[keep], y[keep])


def test_data_dependent_branch_names_the_line():
    with pytest.raises(fxpar.CaptureError, match=r"the forward of BranchesOnValue branches on a tensor's value at .*test_errors.py:\d+ \(`if h.sum\(\) > 0:  # the line the error names`\).*torch.where\(cond, a, b\) \(or use torch.cond\), or move the decision out of forward"):
        fxpar.plan(BranchesOnValue(), _inputs(), mesh_shape=(2,))


def test_data_dependent_shape_names_the_line():
    with pytest.raises(fxpar.CaptureError, match=r"the forward of MasksByValue calls an op whose output shape depends on tensor values at .*test_errors.py:\d+ \(`return F.cross_entropy\(h\[keep\], y\[keep\]\)`\).*torch.where\(mask, x, 0\) instead of x\[mask\]"):
        fxpar.plan(MasksByValue(), _inputs(), mesh_shape=(2,))


# Hand-edited plan JSON: PlanFileError (a PlanMismatchError) naming the key, the value and a fix.


@pytest.fixture(scope="module")
def mlp_plan():
    model = MLP((8, 16, 4))
    return model, fxpar.plan(model, model.example_inputs(8), mesh_shape=(2,))


def _edited(plan, edit) -> str:
    import json

    d = json.loads(plan.to_json())
    edit(d)
    return json.dumps(d)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["strategies"]["addmm"]["outputs"][0].__setitem__(0, "Q(1)"),
     r"strategies\['addmm'\].outputs\[0\]\[0\] is 'Q\(1\)' \(a str\); it must be a placement: 'R' \(replicated\), 'P' \(partial sum\) or 'S\(d\)'"),
    (lambda d: d["strategies"]["addmm"]["outputs"][0].__setitem__(0, "S(-1)"), r"outputs\[0\]\[0\] is 'S\(-1\)'"),
    (lambda d: d["param_specs"].__setitem__("layers.0.weight", ["R", "R"]),
     r"param_specs\['layers.0.weight'\] is \['R', 'R'\] \(a list\); it must be a list of 1 placements, one per mesh axis"),
    (lambda d: d.pop("strategies"), r"plan JSON: unknown keys \[\], missing keys \['strategies'\]"),
    (lambda d: d.__setitem__("notes", "x"), r"plan JSON: unknown keys \['notes'\], missing keys \[\]"),
    (lambda d: d.__setitem__("mesh_shape", [2.5]), r"mesh_shape is \[2.5\] \(a list\); it must be a non-empty list of positive whole numbers"),
    (lambda d: d.__setitem__("predicted_step_s", "fast"), r"predicted_step_s is 'fast' \(a str\); it must be a number"),
    (lambda d: d.__setitem__("optimizer", "lion"), r"optimizer is 'lion' \(a str\); it must be one of \['adam'"),
    (lambda d: d["cluster"]["device"].__setitem__("compute_efficiency", 5.0),
     r"plan JSON: cluster: cluster 'cpu-local': device.compute_efficiency is 5.0; it must be in \(0, 1\]"),
])
def test_hand_edited_plan_json(mlp_plan, edit, match):
    _, plan = mlp_plan
    with pytest.raises(PlanFileError, match=match + r".*"):
        fxpar.Plan.from_json(_edited(plan, edit))


def test_plan_json_that_is_not_a_plan():
    with pytest.raises(PlanFileError, match=r"plan JSON is not valid JSON: Expecting value at line 1, column 1; make plans with fxpar.plan"):
        fxpar.Plan.from_json("plan")
    with pytest.raises(PlanFileError, match=r"plan JSON nests too deeply to be a plan"):
        fxpar.Plan.from_json("[" * 100000 + "]" * 100000)
    with pytest.raises(PlanFileError, match=r"plan JSON: the top level is \[1\] \(a list\); it must be an object with the keys"):
        fxpar.Plan.from_json("[1]")
    assert issubclass(PlanFileError, fxpar.PlanMismatchError)


def test_param_specs_contradicting_strategies(mlp_plan):
    from fxpar.planner import capture_and_annotate

    model, plan = mlp_plan
    gm = capture_and_annotate(model, model.example_inputs(8))
    edited = fxpar.Plan.from_json(_edited(plan, lambda d: d["param_specs"].__setitem__("layers.0.weight", ["S(0)"])))
    with pytest.raises(fxpar.PlanMismatchError, match=r"the plan contradicts itself: param_specs\['layers.0.weight'\] is S\(0\) but the strategy of its node %params_1 places it R; plan again"):
        edited.assignment(gm)
    edited = fxpar.Plan.from_json(_edited(plan, lambda d: d["param_specs"].pop("layers.0.bias")))
    with pytest.raises(fxpar.PlanMismatchError, match=r"the plan has no param_specs entry for parameter layers.0.bias \(node %params_2\)"):
        edited.assignment(gm)
