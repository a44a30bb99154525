"""Real multi-process gloo training against single-process training."""

from __future__ import annotations

import math

import pytest
import torch

import fxpar
from fxpar.launch import RankError
from fxpar.runtime.codegen import cpp_compiler

from . import train_fns as t

NUM_STEPS = 5
ZERO = {"layers.0.weight": "S(0)", "layers.1.weight": "S(0)", "layers.2.weight": "S(0)"}


def test_zero_plan_exercises_asynchronous_gradient_sync():
    from fxpar.passes.rewrite import rewrite
    from fxpar.planner import capture_and_annotate, plan_graph

    funcol = torch.ops._c10d_functional
    gm = capture_and_annotate(t.mlp_model(), t.mlp_inputs(0))
    plan, _ = plan_graph(gm, mesh_shape=(2,), force=ZERO)
    nodes = list(rewrite(gm, plan.assignment(gm), (2,)).graph.nodes)
    scatters = [n for n in nodes if n.target is funcol.reduce_scatter_tensor.default]
    # Issued where the gradient is made, waited for after the last compute op.
    last_compute = max(i for i, n in enumerate(nodes) if n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default))
    assert scatters, "the ZeRO case below is meant to reduce-scatter gradients"
    assert any(nodes.index(s) < last_compute for s in scatters)
    assert all(nodes.index(next(iter(s.users))) > last_compute for s in scatters), "a gradient sync is waited for early"


@pytest.fixture(scope="module")
def reference():
    return t.reference_training(t.mlp_model, t.mlp_inputs, NUM_STEPS)


def _check(results, reference):
    ref_losses, ref_state = reference
    for losses, state, *_ in results:
        for got, want in zip(losses, ref_losses):
            assert got == pytest.approx(want, rel=1e-5)
        assert set(state) == set(ref_state)
        for key, want in ref_state.items():
            torch.testing.assert_close(state[key], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mesh, force",
    [
        ((2,), None),
        ((4,), None),
        ((2,), {"layers.0.weight": "S(0)", "layers.1.weight": "S(1)"}),  # Megatron-style block
        ((4,), {"layers.0.weight": "S(1)", "layers.1.weight": "S(0)", "layers.2.weight": "S(0)"}),
        ((2, 2), {"layers.0.weight": "(S(0),S(1))", "layers.1.weight": "(S(1),R)"}),
        ((2,), ZERO),  # gradients reduce-scattered asynchronously
    ],
    ids=str,
)
def test_fxpar_compile_matches_single_process(reference, mesh, force):
    results = fxpar.launch(t.train_fxpar, math.prod(mesh), mesh, NUM_STEPS, force)
    _check(results, reference)
    assert all(r[3] == "eager" for r in results)
    plans = [fxpar.Plan.from_json(r[2]) for r in results]
    assert all(p.strategies == plans[0].strategies for p in plans), "ranks ran different plans"
    if force:
        plan = plans[0]
        assert any(any(repr(p) != "R" for p in spec) for spec in plan.param_specs.values())


@pytest.mark.skipif(cpp_compiler() is None, reason="Inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize(
    "mesh, force",
    [((2,), None), ((2,), {"layers.0.weight": "S(0)", "layers.1.weight": "S(1)"})],
    ids=["data-parallel", "megatron-block"],
)
def test_inductor_compiled_step_matches_single_process(reference, mesh, force):
    """The same per-rank graph compiled by Inductor (a few cases: each compiles for seconds)."""
    results = fxpar.launch(t.train_fxpar, math.prod(mesh), mesh, NUM_STEPS, force, None, 0.05, "inductor")
    _check(results, reference)
    assert all(r[3] == "inductor" for r in results)


@pytest.mark.parametrize(
    "mesh, force, codegen",
    [((2,), None, "eager"),
     ((2,), {"layers.0.weight": "S(0)", "layers.1.weight": "S(1)"}, "eager"),  # Megatron-style block
     ((2, 2), {"layers.0.weight": "(S(0),S(1))", "layers.1.weight": "(S(1),R)"}, "inductor")],
    ids=["default", "megatron-block", "2d-inductor"],
)
def test_whole_batch_on_every_rank_matches_single_process(reference, mesh, force, codegen):
    """``input_placement="replicate"``: every rank passes the whole global batch; the inputs are
    planned replicated, so no collective brings a cut batch together, and training is exact."""
    if codegen == "inductor" and cpp_compiler() is None:
        pytest.skip("Inductor on CPU needs a C++ compiler")
    results = fxpar.launch(t.train_fxpar_whole_batch, math.prod(mesh), mesh, NUM_STEPS, force, codegen)
    _check(results, reference)
    x, y = t.mlp_inputs(0)
    for *_, input_specs, local_shapes in results:
        assert input_specs == [["R"] * len(mesh)] * 2, input_specs
        assert local_shapes == [tuple(x.shape), tuple(y.shape)], local_shapes
    plan = fxpar.Plan.from_json(results[0][2])
    assert plan.input_placement == "replicate"
    assert fxpar.Plan.from_json(plan.to_json()).input_placement == "replicate"


@pytest.mark.parametrize("nprocs, options", [(2, None), (4, None), (4, {"mesh_shape": (2, 2)})], ids=str)
def test_torch_compile_backend_matches_single_process(reference, nprocs, options):
    _check(fxpar.launch(t.train_torch_compile, nprocs, NUM_STEPS, options), reference)


def test_launch_reraises_with_the_rank_named():
    with pytest.raises(RankError, match=r"rank 1 of 2 failed: ValueError: rank 1 says no"):
        fxpar.launch(t.fail_on_rank_one, 2)


def test_launch_returns_results_in_rank_order():
    assert fxpar.launch(t.world_info, 3) == [(0, 3), (1, 3), (2, 3)]
