"""Placements of a tensor on a device mesh.

A tensor's layout on an N-D mesh is a ``Spec``: one placement per mesh axis, in mesh order.

- ``Replicate()``: every device on the axis holds the whole tensor.
- ``Shard(dim)``: the tensor is cut into equal chunks along ``dim``; device ``i`` of the axis holds
  chunk ``i``. When several axes shard the same dim, the outer (lower) axis cuts first, so the flat
  chunk index is the mixed-radix number of the coordinates of those axes in mesh order.
- ``Partial(reduce)``: every device holds a term; the tensor is their reduction (only ``sum``).

fxpar shards only evenly: a dim must be divisible by the product of the axis sizes that shard it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True, order=True)
class Replicate:
    def __repr__(self) -> str:
        return "R"


@dataclass(frozen=True, order=True)
class Shard:
    dim: int

    def __repr__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True, order=True)
class Partial:
    reduce: str = "sum"

    def __repr__(self) -> str:
        return "P"


Placement = Union[Replicate, Shard, Partial]
Spec = tuple[Placement, ...]

R = Replicate()
P = Partial()


def spec_str(spec: Spec) -> str:
    return "".join(repr(p) for p in spec) if len(spec) == 1 else "(" + ",".join(map(repr, spec)) + ")"


def placement_from_str(text: str) -> Placement:
    if text == "R":
        return R
    if text == "P":
        return P
    if text.startswith("S(") and text.endswith(")"):
        return Shard(int(text[2:-1]))
    raise ValueError(f"unknown placement {text!r}; expected 'R', 'P' or 'S(<dim>)'")


def shard_factor(spec: Spec, mesh_shape: tuple[int, ...], dim: int) -> int:
    """How many pieces dim ``dim`` is cut into under ``spec``."""
    factor = 1
    for axis, placement in enumerate(spec):
        if isinstance(placement, Shard) and placement.dim == dim:
            factor *= mesh_shape[axis]
    return factor


def local_shape(shape: tuple[int, ...], spec: Spec, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape each device holds. Assumes ``is_even(shape, spec, mesh_shape)``."""
    return tuple(size // shard_factor(spec, mesh_shape, dim) for dim, size in enumerate(shape))


def num_pieces(spec: Spec, mesh_shape: tuple[int, ...]) -> int:
    """By how much a tensor's per-device size shrinks under ``spec``."""
    out = 1
    for axis, placement in enumerate(spec):
        if isinstance(placement, Shard):
            out *= mesh_shape[axis]
    return out


def is_even(shape: tuple[int, ...], spec: Spec, mesh_shape: tuple[int, ...]) -> bool:
    for placement in spec:
        if isinstance(placement, Shard) and not 0 <= placement.dim < len(shape):
            return False
    return all(size % shard_factor(spec, mesh_shape, dim) == 0 for dim, size in enumerate(shape))


def replicated(ndim: int) -> Spec:
    return (R,) * ndim
