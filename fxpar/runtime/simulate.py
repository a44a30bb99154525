"""Run every rank of a mesh in one process: the per-rank graphs that real ranks run, under torch's
``LocalTensorMode``.

``simulate_plan`` rewrites the global graph once per rank (``fxpar.passes.rewrite``, with that
rank's mesh coordinates and the axis group names of an in-process ``fake`` process group) and runs
the graphs in lockstep under ``torch.distributed._local_tensor.LocalTensorMode``: a value is one
``LocalTensor`` holding every rank's tensor, an op whose arguments are the same on every rank runs
once under the mode (which applies it to each rank's tensor), and the functional collectives run
through the mode's own implementations of them (``_c10d_functional.all_reduce`` and the rest)
over the ranks of each axis group. Ops whose constants differ between ranks (a rank's slice
offset, the 1 or 0 of ``keep_one``) run once per rank on that rank's tensors. No collective is
implemented here. Used by the property tests to check any plan, and every rule strategy, against
the single-device graph.

``run_plan_rank`` is the counterpart on real ranks: the same rewrite for this process's rank of a
``torch.distributed`` group, bucketed and run by a code generator (Inductor or eager), so that the
checks above can also be made of the code that Inductor generates (C++ kernels cannot run on
``LocalTensor``s).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from fxpar.placement import Spec, replicated
from fxpar.runtime.steps import RankMesh, reshard

__all__ = ["fake_world", "run_plan_rank", "shard_for_ranks", "simulate", "simulate_plan"]


def _coords(mesh_shape: Sequence[int]) -> list[tuple[int, ...]]:
    return list(itertools.product(*[range(s) for s in mesh_shape]))


@contextlib.contextmanager
def fake_world(mesh_shape: Sequence[int]) -> Iterator[tuple[str, ...]]:
    """An in-process ``fake`` process group of the mesh's size (rank 0's view, as ``LocalTensorMode``
    expects) and a ``DeviceMesh`` over it; yields the group name of every mesh axis. Made for the
    duration of the block and destroyed after it; refuses to run where a process group exists."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "the fxpar simulator makes its own in-process process group; call it where no "
            "torch.distributed process group is initialized"
        )
    num_devices = 1
    for s in mesh_shape:
        num_devices *= s
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=num_devices)
    try:
        mesh = init_device_mesh("cpu", tuple(mesh_shape))
        yield tuple(mesh.get_group(a).group_name for a in range(len(mesh_shape)))
    finally:
        dist.destroy_process_group()


def _unwrap(value, rank: int):
    return value._local_tensors[rank] if isinstance(value, LocalTensor) else value


def _wrap(per_rank: list):
    """Per-rank results (same structure on every rank) as one value of LocalTensors."""
    flat = [pytree.tree_flatten(v) for v in per_rank]
    leaves = []
    for i, leaf in enumerate(flat[0][0]):
        if isinstance(leaf, torch.Tensor):
            leaves.append(LocalTensor({r: f[0][i] for r, f in enumerate(flat)}))
        else:
            leaves.append(leaf)
    return pytree.tree_unflatten(leaves, flat[0][1])


def _positional(node: Node, index: dict[Node, int]):
    """The node's arguments with every node replaced by its position in its graph."""
    return torch.fx.node.map_arg((node.args, node.kwargs), index.__getitem__)


def simulate(graphs: Sequence[GraphModule], rank_inputs: Sequence[Sequence[torch.Tensor]]) -> list[list]:
    """Run ``graphs[r]`` on ``rank_inputs[r]`` for every rank r, in lockstep under
    ``LocalTensorMode``; the graphs must come from one rewrite for the ranks of one mesh (inside
    ``fake_world``). A graph is a ``GraphModule`` or anything with a ``graph`` and its ``get_attr``
    constants as attributes. Returns each rank's outputs."""
    num_ranks = len(graphs)
    assert len(rank_inputs) == num_ranks
    node_lists = [list(g.graph.nodes) for g in graphs]
    assert len({len(nodes) for nodes in node_lists}) == 1, "the ranks' graphs differ in length"
    positions = [{n: i for i, n in enumerate(nodes)} for nodes in node_lists]
    envs: list[dict[Node, object]] = [{} for _ in graphs]
    placeholder_index = 0
    with LocalTensorMode(num_ranks) as mode:
        for nodes in zip(*node_lists):
            first = nodes[0]
            assert all(n.op == first.op and n.target == first.target for n in nodes), [str(n.target) for n in nodes]
            if first.op == "placeholder":
                value = _wrap([inputs[placeholder_index] for inputs in rank_inputs])
                placeholder_index += 1
            elif first.op == "get_attr":
                value = _wrap([getattr(g, n.target) for g, n in zip(graphs, nodes)])
            elif first.op == "output":
                outs = [torch.fx.node.map_arg(n.args[0], env.__getitem__) for n, env in zip(nodes, envs)]
                return [[_unwrap(v, r) for v in out] for r, out in enumerate(outs)]
            else:
                shared = _positional(first, positions[0])
                if all(_positional(n, pos) == shared for n, pos in zip(nodes[1:], positions[1:])):
                    args, kwargs = torch.fx.node.map_arg((first.args, first.kwargs), envs[0].__getitem__)
                    value = first.target(*args, **kwargs)
                else:
                    calls = [torch.fx.node.map_arg((n.args, n.kwargs), env.__getitem__) for n, env in zip(nodes, envs)]
                    assert getattr(first.target, "namespace", None) != "_c10d_functional", f"{first.name}: arguments differ between ranks"
                    with mode.disable():
                        value = _wrap([n.target(*pytree.tree_map(lambda v, r=r: _unwrap(v, r), c[0]),
                                                **pytree.tree_map(lambda v, r=r: _unwrap(v, r), c[1]))
                                       for r, (n, c) in enumerate(zip(nodes, calls))])
            for n, env in zip(nodes, envs):
                env[n] = value
    raise AssertionError("graph without output")


def shard_for_ranks(value: torch.Tensor, spec: Spec, mesh_shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Each rank's local piece of a full ``value`` under ``spec`` (rank order = row-major coords)."""
    rep = replicated(len(mesh_shape))
    # From Replicate every step is local (a chunk or keep_one), so no process group is needed.
    return [reshard(value, rep, spec, RankMesh.placeholder(mesh_shape, c)) for c in _coords(mesh_shape)]


def simulate_plan(gm: GraphModule, assignment: dict, mesh_shape: tuple[int, ...], full_inputs: list[torch.Tensor],
                  output_specs=None, batch_norm: str = "global") -> list[list]:
    """Rewrite ``gm`` under ``assignment`` for every rank (``batch_norm``: the rewrite's option),
    slice ``full_inputs`` per the placeholders' specs, and run every rank; returns each rank's
    outputs."""
    from fxpar.passes.rewrite import rewrite_graph

    mesh_shape = tuple(mesh_shape)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pieces = [shard_for_ranks(v, assignment[n].outputs[0], mesh_shape) for n, v in zip(placeholders, full_inputs)]
    coords = _coords(mesh_shape)
    rank_inputs = [[p[r] for p in pieces] for r in range(len(coords))]
    with fake_world(mesh_shape) as names:
        # Interpreted once each, so no Python code is generated for them (half of a rewrite's time).
        graphs = [_Interpreted(rewrite_graph(gm, assignment, mesh_shape, coords=c, group_names=names,
                                             output_specs=output_specs, batch_norm=batch_norm), gm) for c in coords]
        return simulate(graphs, rank_inputs)


class _Interpreted:
    """A rank's graph as ``simulate`` reads it: ``graph``, and its constants from ``root``."""

    def __init__(self, graph: torch.fx.Graph, root: GraphModule):
        self.graph = graph
        self._root = root

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_root"], name)


def run_plan_rank(gm: GraphModule, assignment: dict, mesh_shape: tuple[int, ...], full_inputs: list[torch.Tensor],
                  output_specs=None, batch_norm: str = "global", codegen: str = "inductor") -> list[torch.Tensor]:
    """This process's outputs of ``gm`` under ``assignment``, run on the real ranks of the current
    ``torch.distributed`` group (``prod(mesh_shape)`` ranks, as ``fxpar.launch`` makes): the step
    ``FxparModule`` would run for this rank's coordinates in a ``DeviceMesh`` of ``mesh_shape``
    (``fxpar.runtime.codegen.build_rank_step``: rewritten, its collectives bucketed, compiled by
    ``codegen``), called on this rank's slice of ``full_inputs``. Every rank must call it with the same arguments."""
    from torch.distributed.device_mesh import init_device_mesh

    from fxpar.runtime.codegen import build_rank_step

    mesh_shape = tuple(mesh_shape)
    rank_mesh = RankMesh.from_device_mesh(init_device_mesh("cpu", mesh_shape))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [shard_for_ranks(v, assignment[n].outputs[0], mesh_shape)[rank_mesh.rank] for n, v in zip(placeholders, full_inputs)]
    _, step = build_rank_step(gm, assignment, rank_mesh, inputs, codegen=codegen, device=torch.device("cpu"),
                              batch_norm=batch_norm, output_specs=output_specs)
    outputs = list(step(*inputs))
    if step.codegen != codegen:
        raise RuntimeError(f"asked for codegen={codegen!r}, ran {step.codegen!r}")
    return outputs
