"""The per-rank graph as code: only torch ops and functional collectives in it, bucketed gradient
all-reduces, batch norm cut over the batch with its statistics combined over the ranks, and the
code generator's options and fallback."""

from __future__ import annotations

import operator

import pytest
import torch

import fxpar
from fxpar.models import ResNet18
from fxpar.passes.rewrite import rewrite
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.rules import norm
from fxpar.runtime import codegen
from fxpar.runtime.simulate import fake_world

from . import collective_fns as c
from . import loop_fns as f
from . import train_fns as t

funcol = torch.ops._c10d_functional
aten = torch.ops.aten


def _mlp_plan(mesh=(2,), force=None):
    gm = capture_and_annotate(t.mlp_model(), t.mlp_inputs(0))
    plan, _ = plan_graph(gm, mesh_shape=mesh, force=force)
    return gm, plan


def test_rank_graph_holds_only_torch_ops_and_functional_collectives():
    gm, plan = _mlp_plan((2, 2), {"layers.0.weight": "(S(0),S(1))", "layers.1.weight": "(S(1),R)"})
    for coords in [(0, 0), (1, 1)]:
        local = rewrite(gm, plan.assignment(gm), (2, 2), coords=coords, group_names=("g0", "g1"))
        targets = {n.target for n in local.graph.nodes if n.op == "call_function"}
        assert all(isinstance(x, torch._ops.OpOverload) or x is operator.getitem for x in targets), targets
        groups = {n.args[-1] for n in local.graph.nodes if getattr(n.target, "namespace", None) == "_c10d_functional"
                  and n.target is not funcol.wait_tensor.default}
        assert groups and groups <= {"g0", "g1"}


def test_rank_graphs_differ_only_in_their_slice_offsets():
    # The first layer computed replicated, its relu on the batch: a chunk at each rank's offset.
    gm, plan = _mlp_plan((2,), {"layers.0.weight": "S(0)", "layers.1.weight": "S(1)", "addmm": "R,R,R->R", "relu": "S(0)->S(0)"})
    graphs = [rewrite(gm, plan.assignment(gm), (2,), coords=(c,)) for c in (0, 1)]
    slices = [[n.args for n in g.graph.nodes if n.target is aten.slice.Tensor] for g in graphs]
    assert slices[0] and slices[0] != slices[1]
    assert [n.target for n in graphs[0].graph.nodes] == [n.target for n in graphs[1].graph.nodes]


def _data_parallel(model, batch: int):
    """The model's graph and a data-parallel plan on 2 devices: every parameter replicated and every
    batch norm cut over the batch (forced, so that the test does not hang on the cost model's
    preference between that and replicating a model this small)."""
    from fxpar.solve.strategies import node_strategies

    gm = capture_and_annotate(model, model.example_inputs(batch))
    force = {fqn: "R" for fqn, _ in model.named_parameters()}
    for n in gm.graph.nodes:
        if n.target is aten._native_batch_norm_legit_functional.default:
            cut = [s for s in node_strategies(n, (2,)) if repr(s.inputs[0][0]) == "S(0)"]
            assert cut, f"{n.name} has no strategy that cuts the batch"
            force[n.name] = cut[0].label()
    plan, _ = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8", num_devices=2), mesh_shape=(2,), force=force)
    assert all(all(repr(p) == "R" for p in spec) for spec in plan.param_specs.values()), "expected data parallelism"
    return gm, plan


def test_gradient_all_reduces_are_bucketed():
    torch.manual_seed(0)
    gm, plan = _data_parallel(fxpar.models.MLP((256, 1024, 1024, 256)), 2048)
    with fake_world((2,)) as names:
        local = rewrite(gm, plan.assignment(gm), (2,), group_names=names)
        before = sum(n.target is funcol.all_reduce.default for n in local.graph.nodes)
        inputs = t.rank0_inputs(gm, plan.assignment(gm), (2,))
        codegen.bucket_collectives(local, inputs)
        after = sum(n.target is funcol.all_reduce.default for n in local.graph.nodes)
    # One all-reduce per gradient (six) and one for a loss left as a Partial sum before, one
    # bucket of them after.
    loss = next(iter(gm.graph.output_node().args[0]))
    partial_loss = repr(plan.strategies[loss.name].outputs[0][0]) == "P"
    assert (before, after) == (6 + partial_loss, 1)


def test_data_parallel_batch_norm_communicates_statistics_not_activations():
    torch.manual_seed(0)
    gm, plan = _data_parallel(ResNet18(num_classes=8, image_size=32, width=1 / 16), 64)
    bn = [n for n in gm.graph.nodes if n.target is aten._native_batch_norm_legit_functional.default]
    assert bn and all(repr(plan.strategies[n.name].inputs[0][0]) == "S(0)" for n in bn)
    with fake_world((2,)) as names:
        local = rewrite(gm, plan.assignment(gm), (2,), group_names=names)
        codegen.bucket_collectives(local, t.rank0_inputs(gm, plan.assignment(gm), (2,)))  # propagates shapes
    targets = [n.target for n in local.graph.nodes]
    assert targets.count(norm.batch_norm_global_stats) == targets.count(norm.batch_norm_global_stats_backward) == len(bn)
    # Only per-channel statistics (and the loss's scalars) cross ranks, no activation.
    moved = [n.args[0].meta["val"] for n in local.graph.nodes if getattr(n.target, "namespace", None) == "_c10d_functional"
             and n.target is not funcol.wait_tensor.default]
    assert moved and all(v.dim() <= 1 for v in moved), [tuple(v.shape) for v in moved]


def test_all_gathers_on_gloo_run_as_all_to_alls_with_the_same_values():
    for result in fxpar.launch(c.gathers_as_all_to_alls, 2):
        assert result == {"all_gathers": 0, "all_to_alls": 2, "same": [True, True, True],
                          "shapes": [(6, 4, 5), (14,), (3, 8, 5)]}


def test_batch_norm_statistics_on_gloo_are_gathered_as_all_to_alls():
    # Inside a graph node (the rewrite's batch_norm_global_stats), where gloo_all_gathers cannot
    # see them: the traced node holds no gloo all-gather, and computes the whole batch's norm.
    for result in fxpar.launch(c.batch_norm_stats_gathered_as_all_to_alls, 2):
        assert result == {"all_gathers": 0, "all_to_alls": 1, "close": True}


def test_all_gathers_of_groups_not_on_gloo_are_kept():
    # Stand-in group names (no process group has them): the graph keeps its all-gathers.
    gm, plan = _mlp_plan((2,), {"layers.0.weight": "S(0)", "addmm": "R,R,R->R"})
    local = rewrite(gm, plan.assignment(gm), (2,), coords=(0,), group_names=("g0",))
    codegen.bucket_collectives(local, t.rank0_inputs(gm, plan.assignment(gm), (2,)))
    before = [n.target for n in local.graph.nodes].count(funcol.all_gather_into_tensor.default)
    codegen.gloo_all_gathers(local, torch.device("cpu"))
    assert before and [n.target for n in local.graph.nodes].count(funcol.all_gather_into_tensor.default) == before


def test_unknown_codegen_is_refused():
    with pytest.raises(codegen.CodegenError, match=r"codegen='jit' is not one of \['inductor', 'eager'\]"):
        codegen.check_codegen("jit")


def test_inductor_without_a_cpp_compiler_falls_back_to_eager(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    gm, _ = _mlp_plan()
    with pytest.warns(fxpar.FallbackWarning, match="needs a C\\+\\+ compiler on CPU and none was found"):
        step = codegen.compile_step(gm, "inductor", torch.device("cpu"))
    assert step.codegen == "eager" and step.compile_s == 0.0


def test_failed_vectorized_inductor_compile_is_retried_unvectorized_with_a_warning(monkeypatch):
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor import config
    from torch._inductor.exc import InductorError

    seen = []

    def fake_compile_fx(gm, args):
        seen.append(config.cpp.simdlen)
        if len(seen) == 1:
            raise InductorError(AssertionError("CppCSEVariable(name: tmp0, is_vec: True, dtype: torch.int64)"), None)
        return gm

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    gm, _ = _mlp_plan()
    with pytest.warns(fxpar.FallbackWarning, match=r"vectorized C\+\+ code generation failed .*CppCSEVariable.*cpp.simdlen=1"):
        fn = codegen._inductor(gm, [torch.zeros(2)])
    assert fn is gm and seen == [config.cpp.simdlen, 1]


def test_a_partial_loss_joins_the_gradient_bucket():
    # The per-example losses summed on each rank's half of the batch: the loss leaves the graph
    # as a Partial sum, whose all-reduce is issued after the gradients' and bucketed with them.
    torch.manual_seed(0)
    model = fxpar.models.MLP((256, 1024, 1024, 256))
    gm = capture_and_annotate(model, model.example_inputs(2048))
    force = {fqn: "R" for fqn, _ in model.named_parameters()}
    force["sum_2"] = "S(0)->P"
    plan, _ = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8", num_devices=2), mesh_shape=(2,), force=force)
    loss = next(iter(gm.graph.output_node().args[0]))
    assert repr(plan.strategies[loss.name].outputs[0][0]) == "P"
    with fxpar.runtime.simulate.fake_world((2,)) as names:
        local = rewrite(gm, plan.assignment(gm), (2,), group_names=names)
        reduces = [n for n in local.graph.nodes if n.target is funcol.all_reduce.default]
        codegen.bucket_collectives(local, t.rank0_inputs(gm, plan.assignment(gm), (2,)))
        after = [n for n in local.graph.nodes if n.target is funcol.all_reduce.default]
    # Six gradients and the loss, one bucket of them after.
    assert (len(reduces), len(after)) == (7, 1)
    out = local.graph.output_node().args[0]
    # The loss is a view of the bucket's result, not a collective of its own.
    assert after[0] in _ancestors(out[0])


def _ancestors(node) -> set:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def test_convolution_inputs_are_made_channels_last_and_compute_the_same():
    """``channels_last_inputs`` gives the image a channels-last copy that the convolution reads;
    the graph's outputs (loss, gradients) are unchanged."""
    model = f.norm_net()
    model.drop.p = 0.0
    gm = capture_and_annotate(model, f.images(0))
    args = ([p.detach() for p in model.parameters()], [b.clone() for b in model.buffers()], list(f.images(0)))
    flat = [*args[0], *args[1], *args[2]]
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == len(flat)
    want = gm(*args)
    codegen.channels_last_inputs(gm, flat)
    (copy,) = [n for n in gm.graph.nodes if n.target is aten.clone.default]
    assert copy.kwargs["memory_format"] is torch.channels_last and copy.args[0].op == "placeholder"
    # Every reader of the image reads the copy: the convolution and its backward (for the weight's gradient).
    assert {u.target for u in copy.users} == {aten.convolution.default, aten.convolution_backward.default}
    assert not [u for u in copy.args[0].users if u is not copy]
    got = gm(*args)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(codegen.cpp_compiler() is None, reason="Inductor on CPU needs a C++ compiler")
def test_a_conv_net_compiled_by_inductor_trains_like_one_process():
    ref_losses, ref_state = f.conv_net_reference(2)
    for losses, state, ops in fxpar.launch(f.conv_net_compiled, 2, 2, timeout_s=300):
        assert "aten.clone.default:torch.channels_last" in ops
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for key, want in ref_state.items():
            torch.testing.assert_close(state[key], want, rtol=1e-4, atol=1e-5, msg=key)
