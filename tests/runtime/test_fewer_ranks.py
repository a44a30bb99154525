"""A plan on fewer devices than the process group: the first ranks train, the others stay idle."""

from __future__ import annotations

import pytest
import torch

import fxpar

from . import fewer_fns as f
from . import train_fns as t

NUM_STEPS = 4


@pytest.mark.parametrize(
    "mesh, force",
    [
        # Megatron-style first block, so the two active ranks hold different shards and communicate.
        ((2,), {"layers.0.weight": "S(0)", "layers.1.weight": "S(1)"}),
        # A 2-D sub-mesh, planned by rank 0 inside fxpar.compile.
        ((1, 2), None),
    ],
    ids=str,
)
def test_plan_on_two_of_three_ranks_matches_single_process(mesh, force):
    ref_losses, ref_state = t.reference_training(t.mlp_model, t.mlp_inputs, NUM_STEPS)
    results = fxpar.launch(f.train_on_fewer, 3, mesh, NUM_STEPS, force)
    assert [r[0] for r in results] == ["active", "active", "idle"]
    for _, losses, state, *_ in results[:2]:
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert set(state) == set(ref_state)
        for key, want in ref_state.items():
            torch.testing.assert_close(state[key], want, rtol=1e-5, atol=1e-6)
    plan = fxpar.Plan.from_json(results[0][3])
    assert plan.mesh_shape == mesh
    if force:
        assert repr(plan.param_specs["layers.0.weight"][0]) == "S(0)"
    assert "rank 2 is idle" in results[2][1] and "ranks 0..1" in results[2][1]
    for r in results:
        assert "mesh [4] has 4 devices but the process group has 3 ranks; give a mesh_shape whose sizes " \
               "multiply to at most 3" in r[-1]


def test_idle_module_refuses_to_run_and_says_why():
    from fxpar.api import IdleModule
    from fxpar.errors import IdleRankError

    plan = fxpar.plan(t.mlp_model(), t.mlp_inputs(0), mesh_shape=(2,))
    idle = IdleModule(plan, rank=2)
    assert not idle.is_active and idle.num_ranks == 2 and list(idle.parameters()) == []
    with pytest.raises(IdleRankError, match=r"rank 2 is idle: the plan's mesh \[2\] runs on ranks 0..1, so the step"):
        idle(*t.mlp_inputs(0))
    with pytest.raises(IdleRankError, match=r"state_dict\(\) \(call it on the active ranks\)"):
        idle.state_dict()
