"""Apply a reshard's steps to a tensor: the one place where ``fxpar.reshard.Step``s become tensor ops.

The collectives are torch's functional collectives (``torch.ops._c10d_functional``), addressed by
the group name of the mesh axis; the local steps (``chunk``, ``keep_one``) use this rank's mesh
coordinates, which ``RankMesh`` carries as plain values. Nothing here reads process-global state.
Every op goes through a ``call(target, *args)`` function, so the same code runs eagerly on tensors
(slicing parameters, gathering a ``state_dict``, the simulator's input pieces) and emits graph nodes
in ``fxpar.passes.rewrite`` (``call`` is then ``graph.call_function``, and this rank's slice
offsets become constants of its graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fxpar.placement import Spec
from fxpar.reshard import Step, reshard_steps

__all__ = ["ASYNC_KINDS", "BATCH_NORM_STATS", "RankCoords", "RankMesh", "all_gather_as_all_to_all", "all_gather_over",
           "all_reduce_over", "apply_steps", "reshard", "runs_on_gloo", "start_step", "step_shape"]

aten = torch.ops.aten
funcol = torch.ops._c10d_functional

# Steps that can be left in flight: the collective is issued where the value is produced and
# waited for later (gradient synchronization overlapping the rest of the backward pass).
ASYNC_KINDS = ("all_reduce", "reduce_scatter")

Call = Callable[..., Any]

# How batch norm over a batch cut between devices computes its statistics: "global", those of the
# whole batch (single-device numerics, as torch.nn.SyncBatchNorm; two small collectives per layer,
# on the critical path); "local", each device's own slice (DistributedDataParallel's semantics
# without SyncBatchNorm; no collective in the layer).
BATCH_NORM_STATS = ("global", "local")


def eager(target: Any, *args: Any) -> Any:
    return target(*args)


@dataclass(frozen=True)
class RankMesh:
    """One rank's place in a device mesh: the mesh shape, this rank's coordinate on every axis, and
    the process-group name of every axis (the group of the ranks that share all other coordinates)."""

    shape: tuple[int, ...]
    coords: tuple[int, ...]
    group_names: tuple[str, ...]

    def __post_init__(self) -> None:
        assert len(self.shape) == len(self.coords) == len(self.group_names), self
        assert all(0 <= c < s for c, s in zip(self.coords, self.shape)), self

    @property
    def num_axes(self) -> int:
        return len(self.shape)

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    @property
    def rank(self) -> int:
        """The rank's index in row-major order of the coordinates (its global rank in the mesh)."""
        index = 0
        for c, s in zip(self.coords, self.shape):
            index = index * s + c
        return index

    @staticmethod
    def placeholder(shape: Sequence[int], coords: Sequence[int] | None = None) -> RankMesh:
        """A mesh position with stand-in group names: enough to build and inspect a per-rank graph,
        not to run its collectives."""
        shape = tuple(int(s) for s in shape)
        return RankMesh(shape, tuple(coords) if coords is not None else (0,) * len(shape),
                        tuple(f"fxpar_axis{a}" for a in range(len(shape))))

    @staticmethod
    def from_device_mesh(mesh) -> RankMesh:
        """This process's position in a ``torch.distributed`` ``DeviceMesh``."""
        shape = tuple(mesh.shape)
        return RankMesh(shape, tuple(mesh.get_coordinate()), tuple(mesh.get_group(a).group_name for a in range(len(shape))))


class RankCoords(tuple):
    """A rank's mesh coordinates (a plain tuple of ints to whoever indexes it) that also carry the
    process-group name of every mesh axis, for the ``localize`` hooks of ops that communicate inside
    (batch norm over a split batch all-reduces its statistics), and the rewrite's options those
    hooks read (``batch_norm``: one of ``BATCH_NORM_STATS``)."""

    group_names: tuple[str, ...]
    batch_norm: str = "global"

    @staticmethod
    def of(mesh: RankMesh, batch_norm: str = "global") -> RankCoords:
        out = RankCoords(mesh.coords)
        out.group_names = mesh.group_names
        out.batch_norm = batch_norm
        return out


def all_reduce_over(x, group_names: Sequence[str]):
    """The sum of ``x`` over the ranks of every group in ``group_names`` (one all-reduce each)."""
    for group in group_names:
        x = funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))
    return x


def all_gather_over(x, group_names: Sequence[str], group_sizes: Sequence[int]):
    """Every rank's ``x`` over the groups in ``group_names`` (of ``group_sizes`` ranks), stacked
    along a new dim 0."""
    out = x.unsqueeze(0)
    for group, n in zip(group_names, group_sizes):
        out = out.contiguous()
        if runs_on_gloo(group, out.device):
            # Called inside a graph node (batch norm's statistics), where ``codegen.gloo_all_gathers``
            # does not see it: the same all-to-all form, chosen when the node is traced or run.
            out = funcol.wait_tensor(all_gather_as_all_to_all(out, out.dim(), out.shape[0], n, group))
        else:
            out = funcol.wait_tensor(funcol.all_gather_into_tensor(out, n, group))
    return out


def runs_on_gloo(group_name: str, device: torch.device) -> bool:
    """Whether the process group named ``group_name`` runs ``device``'s collectives with gloo
    (False for a name no group has, such as ``RankMesh.placeholder``'s, and for fake groups)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    if not (dist.is_available() and dist.is_initialized()) or not hasattr(dist, "ProcessGroupGloo"):
        return False
    try:
        backend = _resolve_process_group(group_name)._get_backend(device)
    except (ValueError, RuntimeError, KeyError):
        return False
    return isinstance(backend, dist.ProcessGroupGloo)


def all_gather_as_all_to_all(x, num_dims: int, rows: int, n: int, group: str, call: Call = eager):
    """The all-gather over ``n`` ranks of ``x`` (``num_dims`` dims, ``rows`` along dim 0) as an
    all-to-all, in flight: ``n`` copies of ``x``, ``rows`` to and from every rank, so rank ``i``'s
    piece lands at block ``i`` as in ``all_gather_into_tensor``. How gloo groups run every
    all-gather (``fxpar.runtime.codegen.gloo_all_gathers`` says why)."""
    copies = call(aten.repeat.default, x, [n] + [1] * (num_dims - 1))
    return call(funcol.all_to_all_single.default, copies, [rows] * n, [rows] * n, group)


def step_shape(shape: Sequence[int], step: Step, n: int) -> list[int]:
    """A rank's local shape after ``step`` on an axis of ``n`` devices."""
    out = list(shape)
    if step.kind == "all_gather":
        out[step.dim] *= n
    elif step.kind in ("reduce_scatter", "chunk"):
        out[step.dim] //= n
    elif step.kind == "all_to_all":
        out[step.dim] *= n
        out[step.dim2] //= n
    return out


def _to_front(x, dim: int, call: Call):
    # Collectives work on dim 0 of a contiguous tensor.
    return call(aten.contiguous.default, call(aten.movedim.int, x, dim, 0) if dim != 0 else x)


def _from_front(x, dim: int, call: Call):
    # Contiguous again: some kernels called directly at aten level (CPU flash attention) assume a
    # dense last dim and give wrong values on a transposed layout instead of copying.
    return call(aten.contiguous.default, call(aten.movedim.int, x, 0, dim)) if dim != 0 else x


def start_step(x, shape: Sequence[int], step: Step, mesh: RankMesh, call: Call = eager) -> tuple[Any, Callable[[Any], Any]]:
    """Issue one step on ``x`` (local shape ``shape``); returns the in-flight value and the function
    that finishes it (waits for a collective and restores the dim order). Local steps finish at once."""
    n = mesh.shape[step.axis]
    group = mesh.group_names[step.axis]
    if step.kind == "all_gather":
        # Gathered along dim 0 in coordinate order, then moved back: chunk i of the dim is rank i's.
        front = _to_front(x, step.dim, call)
        if call is eager and front.dim() and runs_on_gloo(group, front.device):
            # Run now, so the group is known: on gloo as the graphs run it (codegen.gloo_all_gathers).
            out = all_gather_as_all_to_all(front, front.dim(), front.shape[0], n, group)
        else:
            out = call(funcol.all_gather_into_tensor.default, front, n, group)
        return out, lambda t: _from_front(call(funcol.wait_tensor.default, t), step.dim, call)
    if step.kind == "all_reduce":
        out = call(funcol.all_reduce.default, call(aten.contiguous.default, x), "sum", group)
        return out, lambda t: call(funcol.wait_tensor.default, t)
    if step.kind == "reduce_scatter":
        out = call(funcol.reduce_scatter_tensor.default, _to_front(x, step.dim, call), "sum", n, group)
        return out, lambda t: _from_front(call(funcol.wait_tensor.default, t), step.dim, call)
    if step.kind == "all_to_all":
        return _all_to_all(x, list(shape), step.dim, step.dim2, n, group, call)
    if step.kind == "chunk":
        size = shape[step.dim] // n
        start = mesh.coords[step.axis] * size
        return call(aten.contiguous.default, call(aten.slice.Tensor, x, step.dim, start, start + size)), _done
    if step.kind == "keep_one":
        # Replicate -> Partial: the first device on the axis keeps the value, the others hold zeros.
        # A multiplication (rather than a branch) keeps every rank's graph the same shape.
        return call(aten.mul.Tensor, x, 1 if mesh.coords[step.axis] == 0 else 0), _done
    raise AssertionError(step)


def _done(t):
    return t


def _all_to_all(x, shape: list[int], dim: int, dim2: int, n: int, group: str, call: Call):
    """``dim`` becomes whole, ``dim2`` becomes sharded: piece j of ``dim2`` goes to rank j, and the
    pieces received are concatenated along ``dim`` in rank order."""
    piece = shape[dim2] // n
    piece_shape = shape[:dim2] + [piece] + shape[dim2 + 1:]
    # [n destinations, *piece_shape], contiguous per destination.
    split = call(aten.reshape.default, x, shape[:dim2] + [n, piece] + shape[dim2 + 1:])
    split = call(aten.contiguous.default, call(aten.movedim.int, split, dim2, 0))
    rows = piece_shape[0]  # what each destination gets, and each source sends, along dim 0
    out = call(funcol.all_to_all_single.default, call(aten.flatten.using_ints, split, 0, 1), [rows] * n, [rows] * n, group)

    def finish(t):
        # Received: [n sources, *piece_shape]; source i's piece goes at block i of ``dim``.
        t = call(aten.reshape.default, call(funcol.wait_tensor.default, t), [n, *piece_shape])
        t = call(aten.flatten.using_ints, call(aten.movedim.int, t, 0, dim), dim, dim + 1)
        return call(aten.contiguous.default, t)

    return out, finish


def apply_steps(x, steps: Sequence[Step], mesh: RankMesh, shape: Sequence[int] | None = None, call: Call = eager):
    """``x`` after ``steps``; ``shape`` is its local shape (taken from ``x`` when it is a tensor)."""
    shape = list(x.shape) if shape is None else list(shape)
    for step in steps:
        value, finish = start_step(x, shape, step, mesh, call)
        x = finish(value)
        shape = step_shape(shape, step, mesh.shape[step.axis])
    return x


def reshard(x: torch.Tensor, src: Spec, dst: Spec, mesh: RankMesh) -> torch.Tensor:
    """``x``, this rank's piece of a tensor laid out as ``src``, as its piece under ``dst``."""
    return apply_steps(x, reshard_steps(src, dst), mesh)
