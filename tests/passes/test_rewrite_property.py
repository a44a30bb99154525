"""For ANY valid strategy assignment, not just the optimum, the rewritten per-rank graphs compute
what the single-device graph computes: the loss on every rank, and every rank's gradient shard."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxpar.runtime.simulate import shard_for_ranks, simulate_plan
from fxpar.solve.strategies import all_strategies

MESHES = [(2,), (4,), (2, 2)]
_CACHE: dict = {}


def _strategies(gm, mesh):
    key = (id(gm), mesh)
    if key not in _CACHE:
        _CACHE[key] = all_strategies(gm, mesh)
    return _CACHE[key]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mesh=st.sampled_from(MESHES))
def test_any_assignment_matches_single_device(mlp_graph, data, mesh):
    model, inputs, gm = mlp_graph
    strategies = _strategies(gm, mesh)
    assignment = {n: s[data.draw(st.integers(0, len(s) - 1), label=n.name)] for n, s in strategies.items()}
    params = [p.detach() for p in model.parameters()]
    ref_loss, *ref_grads = gm(params, [], list(inputs))
    results = simulate_plan(gm, assignment, mesh, params + list(inputs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for rank, (loss, *grads) in enumerate(results):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for p, ref in zip(placeholders, ref_grads):
        want = shard_for_ranks(ref, assignment[p].outputs[0], mesh)
        for rank, out in enumerate(results):
            torch.testing.assert_close(out[1 + placeholders.index(p)], want[rank], rtol=1e-5, atol=1e-6)


# Two fixed draws run compiled by Inductor on real gloo ranks (each compiles for seconds; the second
# needs the unvectorized fallback of fxpar.runtime.codegen).
COMPILED_SEEDS = (0, 1)


def _drawn(gm, mesh, seed: int) -> dict:
    """A strategy assignment drawn uniformly per node with ``random.Random(seed)``."""
    import random

    rng = random.Random(seed)
    return {n: s[rng.randrange(len(s))] for n, s in _strategies(gm, mesh).items()}


def compiled_draws_rank(rank: int, mesh: tuple[int, ...], seeds: tuple[int, ...], codegen: str) -> list:
    """On one gloo rank: (the drawn strategies' labels, this rank's outputs) per seed."""
    from fxpar.planner import capture_and_annotate
    from fxpar.runtime.simulate import run_plan_rank
    from tests.conftest import small_mlp

    model, inputs = small_mlp()
    gm = capture_and_annotate(model, inputs)
    params = [p.detach() for p in model.parameters()]
    out = []
    for seed in seeds:
        assignment = _drawn(gm, mesh, seed)
        out.append(([s.label() for s in assignment.values()], run_plan_rank(gm, assignment, mesh, params + list(inputs), codegen=codegen)))
    return out


def test_drawn_assignments_compiled_by_inductor_match_single_device(mlp_graph):
    from fxpar.launch import launch
    from fxpar.runtime.codegen import cpp_compiler

    if cpp_compiler() is None:
        import pytest

        pytest.skip("Inductor on CPU needs a C++ compiler")
    model, inputs, gm = mlp_graph
    mesh = (2,)
    params = [p.detach() for p in model.parameters()]
    ref_loss, *ref_grads = gm(params, [], list(inputs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # Two small graphs compile in under a minute cold: a rank that hangs is named (with its
    # stack) in minutes, not at the default 600 s.
    results = launch(compiled_draws_rank, 2, mesh, COMPILED_SEEDS, "inductor", timeout_s=300)
    for i, seed in enumerate(COMPILED_SEEDS):
        assignment = _drawn(gm, mesh, seed)
        for rank, r in enumerate(results):
            labels, (loss, *grads) = r[i]
            assert labels == [s.label() for s in assignment.values()], "the ranks drew another assignment"
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            for p, ref in zip(placeholders, ref_grads):
                want = shard_for_ranks(ref, assignment[p].outputs[0], mesh)[rank]
                torch.testing.assert_close(grads[placeholders.index(p)], want, rtol=1e-5, atol=1e-6)
