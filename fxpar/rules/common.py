"""Helpers shared by the rule modules for convolution, pooling, norms, embedding and attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxpar.placement import Placement, R, Shard
from fxpar.rules.registry import OpInfo


def present(args: Sequence, placements: Sequence[Placement]) -> tuple[Placement, ...]:
    """The placements of the arguments that are tensors, in order: an optional tensor argument
    passed as None is no tensor argument of the node."""
    assert len(args) == len(placements)
    return tuple(p for a, p in zip(args, placements) if isinstance(a, torch.Tensor))


def fill_absent_outputs(info: OpInfo) -> tuple[bool, ...]:
    """Which outputs the op does not compute (None, per its ``output_mask``). Each gets an empty
    stand-in in ``info.outputs``, which ``registry.combine`` checks for even shards after the rule
    returns and which would otherwise fail on None; no node reads such an output."""
    absent = tuple(v is None for v in info.outputs)
    if any(absent):
        like = next(v for v in info.outputs if v is not None)
        info.outputs = [like.new_empty((0,)) if v is None else v for v in info.outputs]
    return absent


def absent_as_r(absent: Sequence[bool], placements: Sequence[Placement]) -> tuple[Placement, ...]:
    """Output placements, with R for outputs the op does not compute."""
    return tuple(R if a else p for a, p in zip(absent, placements))


def sharding_axes(spec: tuple[Placement, ...], dim: int) -> tuple[int, ...]:
    """The mesh axes on which ``spec`` cuts tensor dim ``dim``, outer first."""
    return tuple(a for a, p in enumerate(spec) if isinstance(p, Shard) and p.dim == dim)


def shard_index(axes: Sequence[int], mesh_shape: Sequence[int], coords: Sequence[int]) -> int:
    """Which chunk of a dim cut on ``axes`` the device at ``coords`` holds (the mixed-radix number of
    its coordinates on those axes, outer first, as ``fxpar.placement`` defines). Localize hooks call
    it at rewrite time, so the chunk's offset is a constant of that rank's graph."""
    index = 0
    for axis in axes:
        index = index * mesh_shape[axis] + coords[axis]
    return index
