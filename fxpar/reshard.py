"""How a tensor moves from one Spec to another: the one sequence of steps that both the cost model
prices and the rewrite emits, so predicted and executed communication are the same by construction.

Steps run per mesh axis. Axes that change are first undone innermost-first (all-gather a Shard,
all-reduce a Partial), then redone outermost-first (slice to a Shard, keep one copy for a Partial);
an axis whose tensor dim is also sharded by an inner axis is undone and redone with it, because
chunks along one dim nest in mesh order. Where no other axis touches the dims involved, a
Partial->Shard is one reduce-scatter and a Shard(i)->Shard(j) one all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxpar.placement import Partial, R, Replicate, Shard, Spec, local_shape


@dataclass(frozen=True)
class Step:
    kind: str  # all_gather | all_reduce | reduce_scatter | all_to_all | chunk | keep_one
    axis: int
    dim: int | None = None  # the tensor dim gathered / scattered / chunked; None for all_reduce, keep_one
    dim2: int | None = None  # all_to_all: the dim that becomes sharded (``dim`` becomes whole)


COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")


def _touches(spec: Spec, dim: int, skip_axis: int) -> bool:
    return any(isinstance(p, Shard) and p.dim == dim for a, p in enumerate(spec) if a != skip_axis)


def reshard_steps(src: Spec, dst: Spec) -> list[Step]:
    if src == dst:
        return []
    ndim = len(src)
    changing = {a for a in range(ndim) if src[a] != dst[a]}
    grew = True
    while grew:
        grew = False
        for a in sorted(changing):
            for spec in (src, dst):
                if isinstance(spec[a], Shard):
                    for inner in range(a + 1, ndim):
                        if inner not in changing and src[inner] == spec[a]:
                            changing.add(inner)
                            grew = True
    cur = list(src)
    steps: list[Step] = []
    for a in sorted(changing, reverse=True):
        p, q = cur[a], dst[a]
        if isinstance(p, Shard):
            if isinstance(q, Shard) and not _touches(src, p.dim, a) and not _touches(dst, q.dim, a) and not _touches(src, q.dim, a) and not _touches(dst, p.dim, a):
                steps.append(Step("all_to_all", a, p.dim, q.dim))
                cur[a] = q
            else:
                steps.append(Step("all_gather", a, p.dim))
                cur[a] = R
        elif isinstance(p, Partial):
            if isinstance(q, Shard) and not _touches(src, q.dim, a) and not _touches(dst, q.dim, a):
                steps.append(Step("reduce_scatter", a, q.dim))
                cur[a] = q
            else:
                steps.append(Step("all_reduce", a))
                cur[a] = R
    for a in sorted(changing):
        q = dst[a]
        if cur[a] == q:
            continue
        assert isinstance(cur[a], Replicate)
        if isinstance(q, Shard):
            steps.append(Step("chunk", a, q.dim))
        else:
            steps.append(Step("keep_one", a))
        cur[a] = q
    assert tuple(cur) == tuple(dst), (src, dst, cur)
    return steps


def step_specs(src: Spec, steps: list[Step]) -> list[Spec]:
    """The spec after each step."""
    cur = list(src)
    out = []
    for s in steps:
        if s.kind in ("all_gather", "all_reduce"):
            cur[s.axis] = R
        elif s.kind in ("reduce_scatter", "chunk"):
            cur[s.axis] = Shard(s.dim)
        elif s.kind == "all_to_all":
            cur[s.axis] = Shard(s.dim2)
        else:
            cur[s.axis] = Partial()
        out.append(tuple(cur))
    return out


def step_bytes(
    shape: tuple[int, ...], itemsize: int, src: Spec, steps: list[Step], mesh_shape: tuple[int, ...]
) -> list[tuple[Step, int, int]]:
    """(step, per-device bytes before, per-device bytes after) for each step."""
    out = []
    before = src
    for step, after in zip(steps, step_specs(src, steps)):
        nbytes = lambda spec: itemsize * _prod(local_shape(shape, spec, mesh_shape))  # noqa: E731
        out.append((step, nbytes(before), nbytes(after)))
        before = after
    return out


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
