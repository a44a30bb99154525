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
