"""Rank functions (importable by ``fxpar.launch``) for the per-rank graph's collectives on gloo."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxpar.reshard import Step
from fxpar.runtime import codegen
from fxpar.runtime.steps import RankMesh, apply_steps

funcol = torch.ops._c10d_functional


def gathers_as_all_to_alls(rank: int) -> dict:
    """Two all-gathers (a 3-D and a 1-D tensor, both in flight at once) on the world's gloo group,
    run as traced and after ``codegen.gloo_all_gathers``: which collectives the graph holds, and
    whether the outputs are the same."""
    world = dist.get_world_size()
    group = dist.group.WORLD.group_name

    def step(x, y):
        a = funcol.all_gather_into_tensor.default(x, world, group)
        b = funcol.all_gather_into_tensor.default(y, world, group)
        return funcol.wait_tensor.default(a), funcol.wait_tensor.default(b)

    gm = torch.fx.symbolic_trace(step)
    x = torch.arange(60.0).reshape(3, 4, 5) + 100 * rank
    y = torch.arange(7.0) - 100 * rank
    expected = gm(x, y)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x, y)
    codegen.gloo_all_gathers(gm, torch.device("cpu"))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    got = gm(x, y)
    # The eager path (a state_dict's gathers, calibration) along dim 1.
    mesh = RankMesh((world,), (rank,), (group,))
    eager = apply_steps(x, [Step("all_gather", 0, 1)], mesh)
    reference = torch.cat([expected[0][3 * r: 3 * (r + 1)] for r in range(world)], dim=1)
    return {"all_gathers": targets.count(funcol.all_gather_into_tensor.default),
            "all_to_alls": targets.count(funcol.all_to_all_single.default),
            "same": [torch.equal(g, e) for g, e in zip(got, expected)] + [torch.equal(eager, reference)],
            "shapes": [tuple(g.shape) for g in got] + [tuple(eager.shape)]}


def batch_norm_stats_gathered_as_all_to_alls(rank: int) -> dict:
    """Batch norm with the whole batch's statistics on this rank's slice, traced to aten ops (as
    Inductor traces the graph node that calls it) on the world's gloo group: which collectives the
    trace holds, and its output against one process's ``batch_norm`` over the whole batch."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxpar.rules.norm import batch_norm_global_stats

    world = dist.get_world_size()
    group = dist.group.WORLD.group_name
    full = torch.arange(world * 4 * 3 * 2 * 2, dtype=torch.float32).reshape(world * 4, 3, 2, 2).sin()
    x = full.chunk(world)[rank]
    weight, bias = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, -1.0, 3.0])

    def fn(x, weight, bias, mean, var):
        return batch_norm_global_stats(x, weight, bias, mean, var, 0.1, 1e-5, [group], [world])[0]

    args = (x, weight, bias, torch.zeros(3), torch.ones(3))
    traced = make_fx(fn)(*args)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    reference = torch.nn.functional.batch_norm(full, torch.zeros(3), torch.ones(3), weight, bias, training=True)
    return {"all_gathers": targets.count(funcol.all_gather_into_tensor.default),
            "all_to_alls": targets.count(funcol.all_to_all_single.default),
            "close": bool(torch.allclose(traced(*args), reference.chunk(world)[rank], atol=1e-5))}
