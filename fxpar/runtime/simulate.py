"""Run a rewritten (per-rank) graph for every rank of a mesh in one process, in lockstep.

Collective nodes see the values of all ranks of their axis group; every other node runs once per
rank with that rank's coordinates. Used by the property tests to check any plan quickly against
the single-device graph, with the same arithmetic a real process group would do.
"""

from __future__ import annotations

import itertools

import torch
from torch.fx import GraphModule

from fxpar.runtime import collectives as C


class _RankComm:
    def __init__(self, mesh_shape: tuple[int, ...], coords: tuple[int, ...]):
        self.mesh_shape = mesh_shape
        self.coords = coords

    def coord(self, axis: int) -> int:
        return self.coords[axis]


def _collective(target, values: list[torch.Tensor], coords: list[int], n: int, args: tuple) -> list[torch.Tensor]:
    """``values`` of one axis group in coordinate order; returns each member's result."""
    if target is C.all_gather:
        full = torch.cat(values, dim=args[0])
        return [full.clone() for _ in values]
    total = values[0].clone()
    for v in values[1:]:
        total = total + v
    if target in (C.all_reduce, C.all_reduce_start):
        return [total.clone() for _ in values]
    if target in (C.reduce_scatter, C.reduce_scatter_start):
        return [total.chunk(n, args[0])[c].contiguous() for c in coords]
    if target is C.all_to_all:
        dim, dim2 = args
        return [torch.cat([v.chunk(n, dim2)[c] for v in values], dim=dim) for c in coords]
    raise AssertionError(target)


def simulate(gm: GraphModule, mesh_shape: tuple[int, ...], rank_inputs: list[list[torch.Tensor]]) -> list[list]:
    ranks = list(itertools.product(*[range(s) for s in mesh_shape]))
    assert len(rank_inputs) == len(ranks)
    envs: list[dict] = [{} for _ in ranks]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for env, inputs in zip(envs, rank_inputs):
        assert len(inputs) == len(placeholders)
        env.update(zip(placeholders, inputs))
    results: list[list] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            results = [torch.fx.node.map_arg(node.args[0], lambda a, e=env: e[a]) for env in envs]
            break
        if node.op == "get_attr":
            for env in envs:
                env[node] = getattr(gm, node.target)
            continue
        if node.target in C.COLLECTIVE_OPS:
            x, axis, *rest = node.args
            groups: dict[tuple, list[int]] = {}
            for r, coords in enumerate(ranks):
                key = coords[:axis] + coords[axis + 1 :]
                groups.setdefault(key, []).append(r)
            for members in groups.values():
                outs = _collective(
                    node.target, [envs[r][x] for r in members], [ranks[r][axis] for r in members], mesh_shape[axis], tuple(rest)
                )
                for r, out in zip(members, outs):
                    envs[r][node] = out
            continue
        for env, coords in zip(envs, ranks):
            args = torch.fx.node.map_arg(node.args, lambda a, e=env: e[a])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a, e=env: e[a])
            with C.use_comm(_RankComm(mesh_shape, coords)):
                env[node] = node.target(*args, **kwargs)
    return results


def shard_for_ranks(value: torch.Tensor, spec, mesh_shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Each rank's local piece of a full ``value`` under ``spec`` (rank order = row-major coords)."""
    from fxpar.api import run_steps
    from fxpar.placement import replicated

    out = []
    for coords in itertools.product(*[range(s) for s in mesh_shape]):
        with C.use_comm(_RankComm(mesh_shape, coords)):
            out.append(run_steps(value, replicated(len(mesh_shape)), spec))
    return out


def simulate_plan(gm: GraphModule, assignment: dict, mesh_shape: tuple[int, ...], full_inputs: list[torch.Tensor],
                  output_specs=None) -> list[list]:
    """Rewrite ``gm`` under ``assignment``, slice ``full_inputs`` per the placeholders' specs, and
    run every rank; returns each rank's outputs."""
    from fxpar.passes.rewrite import rewrite

    local = rewrite(gm, assignment, mesh_shape, output_specs=output_specs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pieces = [shard_for_ranks(v, assignment[n].outputs[0], mesh_shape) for n, v in zip(placeholders, full_inputs)]
    rank_inputs = [[p[r] for p in pieces] for r in range(len(pieces[0]) if pieces else 1)]
    return simulate(local, mesh_shape, rank_inputs)
