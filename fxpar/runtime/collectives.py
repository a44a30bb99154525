"""The collective and local-slicing ops the rewrite inserts into graphs.

Each op reads the communicator of the running rank (``use_comm``): ``DistComm`` on a real process
group (gloo or NCCL), or the in-process simulator (``fxpar.runtime.simulate``), which intercepts
the collectives and runs the local ops once per simulated rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.distributed as dist


class Comm(Protocol):
    mesh_shape: tuple[int, ...]

    def coord(self, axis: int) -> int: ...
    def all_gather(self, x: torch.Tensor, axis: int, dim: int) -> torch.Tensor: ...
    def all_reduce(self, x: torch.Tensor, axis: int) -> torch.Tensor: ...
    def all_reduce_start(self, x: torch.Tensor, axis: int) -> _Pending: ...
    def reduce_scatter_start(self, x: torch.Tensor, axis: int, dim: int) -> _Pending: ...
    def reduce_scatter(self, x: torch.Tensor, axis: int, dim: int) -> torch.Tensor: ...
    def all_to_all(self, x: torch.Tensor, axis: int, dim: int, dim2: int) -> torch.Tensor: ...


_CURRENT: list[Comm] = []


@contextlib.contextmanager
def use_comm(comm: Comm) -> Iterator[Comm]:
    _CURRENT.append(comm)
    try:
        yield comm
    finally:
        _CURRENT.pop()


def current() -> Comm:
    assert _CURRENT, "fxpar collective called outside use_comm(...)"
    return _CURRENT[-1]


def all_gather(x: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
    return current().all_gather(x, axis, dim)


def all_reduce(x: torch.Tensor, axis: int) -> torch.Tensor:
    return current().all_reduce(x, axis)


def reduce_scatter(x: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
    return current().reduce_scatter(x, axis, dim)


def all_to_all(x: torch.Tensor, axis: int, dim: int, dim2: int) -> torch.Tensor:
    return current().all_to_all(x, axis, dim, dim2)


def chunk(x: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
    comm = current()
    return x.chunk(comm.mesh_shape[axis], dim)[comm.coord(axis)].contiguous()


def keep_one(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Replicate -> Partial: the first device on the axis keeps the value, the others hold zeros."""
    return x if current().coord(axis) == 0 else torch.zeros_like(x)


def all_reduce_start(x: torch.Tensor, axis: int):
    """Start an all-reduce and return a handle for ``wait``: gradient synchronization runs while
    the rest of the backward pass computes."""
    return current().all_reduce_start(x, axis)


def reduce_scatter_start(x: torch.Tensor, axis: int, dim: int):
    return current().reduce_scatter_start(x, axis, dim)


def wait(handle) -> torch.Tensor:
    return handle if isinstance(handle, torch.Tensor) else handle.wait()


COLLECTIVE_OPS = {all_gather, all_reduce, reduce_scatter, all_to_all, all_reduce_start, reduce_scatter_start}
ASYNC_STEPS = {"all_reduce": all_reduce_start, "reduce_scatter": reduce_scatter_start}
STEP_OPS = {"all_gather": all_gather, "all_reduce": all_reduce, "reduce_scatter": reduce_scatter,
            "all_to_all": all_to_all, "chunk": chunk, "keep_one": keep_one}


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Pending:
    def __init__(self, tensor: torch.Tensor, work, finish=None):
        self.tensor, self.work, self.finish = tensor, work, finish

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.finish(self.tensor) if self.finish else self.tensor


class DistComm:
    """Collectives over the sub-groups of a torch.distributed DeviceMesh."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.mesh_shape = tuple(mesh.shape)
        self._coords = mesh.get_coordinate()
        self._groups = [mesh.get_group(a) for a in range(len(self.mesh_shape))]

    def coord(self, axis: int) -> int:
        return self._coords[axis]

    def all_gather(self, x: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
        n = self.mesh_shape[axis]
        src = x.movedim(dim, 0).contiguous()
        out = src.new_empty((n * src.shape[0], *src.shape[1:]))
        _all_gather_single(out, src, group=self._groups[axis])
        return out.movedim(0, dim).contiguous()

    def all_reduce(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=self._groups[axis])
        return out

    def all_reduce_start(self, x: torch.Tensor, axis: int) -> _Pending:
        out = x.clone()
        return _Pending(out, dist.all_reduce(out, group=self._groups[axis], async_op=True))

    def reduce_scatter_start(self, x: torch.Tensor, axis: int, dim: int) -> _Pending:
        n = self.mesh_shape[axis]
        src = x.movedim(dim, 0).contiguous()
        out = src.new_empty((src.shape[0] // n, *src.shape[1:]))
        work = dist.reduce_scatter_tensor(out, src, group=self._groups[axis], async_op=True)
        return _Pending(out, work, lambda t: t.movedim(0, dim).contiguous())

    def reduce_scatter(self, x: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
        n = self.mesh_shape[axis]
        src = x.movedim(dim, 0).contiguous()
        out = src.new_empty((src.shape[0] // n, *src.shape[1:]))
        dist.reduce_scatter_tensor(out, src, group=self._groups[axis])
        return out.movedim(0, dim).contiguous()

    def all_to_all(self, x: torch.Tensor, axis: int, dim: int, dim2: int) -> torch.Tensor:
        n = self.mesh_shape[axis]
        send = torch.stack(x.chunk(n, dim2)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self._groups[axis])
        return torch.cat(recv.unbind(0), dim=dim).contiguous()
