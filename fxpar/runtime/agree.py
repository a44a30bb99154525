"""Ranks that fail together and agree before they start.

``fxpar.compile`` runs on every rank. A rank that fails alone (a batch that does not divide, a
model that does not capture) must not leave the others waiting in a collective, and ranks that
built different models must not train with wrong numbers. Three tools, each a collective over a
*control group* (gloo, on CPU tensors, beside the step's own group):

- ``together(control, what, fn)``: every rank runs ``fn``; then the ranks tell each other whether
  it failed. If any did, every rank raises: the lowest failing rank its own exception, the others
  the same ``FxparError`` subclass with that rank's message (``RankFailedError`` for an exception
  that is not an ``FxparError``).
- ``check_same(control, summary)``: every rank digests a JSON summary (options, graph, parameter
  shapes, plan); where the digests differ, each rank compares its summary with rank 0's and the
  first difference becomes a ``PlanMismatchError`` on every rank.
- ``broadcast_text(control, text, src)``: a string sent as UTF-8 bytes (plans travel as their JSON,
  never as a pickle: ``broadcast_object_list`` would unpickle whatever the sender sends).

torch's ``monitored_barrier`` reports ranks that do not arrive but carries no error text; the
error broadcast here is what lets every rank raise the failing rank's own message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fxpar import errors
from fxpar.errors import FxparError, PlanMismatchError, RankFailedError

T = TypeVar("T")


@dataclass(frozen=True)
class Control:
    """A gloo process group over ``ranks`` (global ranks) for fxpar's own messages;
    ``group`` None is the default group."""

    group: Any
    ranks: tuple[int, ...]

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @staticmethod
    def create(ranks: Sequence[int]) -> Control:
        """Make the control group over ``ranks``; every rank of the default group must call it
        (group creation is collective), with the same ``ranks``."""
        ranks = tuple(ranks)
        world = dist.get_world_size()
        if dist.get_backend() == "gloo" and ranks == tuple(range(world)):
            return Control(None, ranks)
        return Control(dist.new_group(list(ranks), backend="gloo"), ranks)


def broadcast_text(control: Control, text: str | None, src: int) -> str:
    """``text`` of rank ``src`` on every rank of ``control``."""
    if control.rank == src:
        assert text is not None
        data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=src, group=control.group)
    if control.rank != src:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    if data.numel():
        dist.broadcast(data, src=src, group=control.group)
    return bytes(data.tolist()).decode()


def raise_if_any_failed(control: Control, exc: BaseException | None, what: str) -> None:
    """Collective: returns if no rank of ``control`` passed an exception; otherwise raises on
    every rank (see the module docstring)."""
    none = dist.get_world_size()  # above every rank: "no rank failed"
    flag = torch.tensor([control.rank if exc is not None else none], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=control.group)
    src = int(flag.item())
    if src == none:
        return
    text = None
    if control.rank == src:
        text = json.dumps({"type": type(exc).__name__, "fxpar": isinstance(exc, FxparError), "message": str(exc)})
    info = json.loads(broadcast_text(control, text, src))
    if control.rank == src:
        raise exc
    cls = getattr(errors, info["type"], None) if info["fxpar"] else None
    if not (isinstance(cls, type) and issubclass(cls, FxparError)):
        raise RankFailedError(f"rank {src} failed {what} with {info['type']}: {info['message']}")
    raise cls(f"rank {src} failed {what}: {info['message']}")


def together(control: Control, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank of ``control``; if it raises on any rank, raise on all."""
    try:
        result, exc = fn(), None
    except Exception as e:  # noqa: BLE001 (re-raised on this rank, reported to the others)
        result, exc = None, e
    raise_if_any_failed(control, exc, what)
    return result


def _digest(summary: dict) -> torch.Tensor:
    raw = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).digest()
    return torch.tensor([int.from_bytes(raw[i:i + 7], "big") for i in range(0, 28, 7)], dtype=torch.int64)


def first_difference(mine: Any, theirs: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first key path (``a.b``) where two JSON-like values differ, with both values (dicts are
    compared key by key, anything else as a whole)."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in list(mine) + [k for k in theirs if k not in mine]:
            if key not in mine or key not in theirs:
                return (f"{path}.{key}".lstrip("."), mine.get(key, "<missing>"), theirs.get(key, "<missing>"))
            found = first_difference(mine[key], theirs[key], f"{path}.{key}")
            if found:
                return found
        return None
    return None if mine == theirs else (path.lstrip("."), mine, theirs)


def check_same(control: Control, summary: dict, what: str) -> None:
    """Collective: raise ``PlanMismatchError`` on every rank unless every rank's ``summary`` is
    rank 0's (compared by digest; the first difference is named)."""
    digest = _digest(summary)
    everyone = [torch.empty_like(digest) for _ in control.ranks]
    dist.all_gather(everyone, digest, group=control.group)
    if all(torch.equal(d, digest) for d in everyone):
        return
    src = control.ranks[0]
    reference = json.loads(broadcast_text(control, json.dumps(summary) if control.rank == src else None, src))
    exc = None
    found = first_difference(summary, reference)
    if found is not None:
        where, mine, theirs = found
        exc = PlanMismatchError(
            f"ranks disagree on {what}: at {where}, rank {control.rank} has {mine!r} but rank {src} has {theirs!r}; "
            "every rank must build the same model and call fxpar.compile with the same example input shapes and "
            "options (plan=, mesh_shape=, cluster=, optimizer=, codegen=)"
        )
    raise_if_any_failed(control, exc, f"checking {what}")
    raise AssertionError("digests differ but summaries are equal")


def arrive(control: Control, what: str, timeout_s: float) -> None:
    """Collective with a deadline: every rank of ``control`` must call it within ``timeout_s`` of
    each other, or the ranks that did raise ``RankFailedError`` saying which did not."""
    try:
        dist.monitored_barrier(group=control.group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        raise RankFailedError(
            f"{what} is collective, but not every rank of the mesh called it within {timeout_s:g} s ({exc}). "
            "Call it on every rank (e.g. `sd = compiled.state_dict(); if rank == 0: torch.save(sd, path)`), or save "
            "the shards from every rank with torch.distributed.checkpoint: "
            "`dcp.save({'model': compiled.sharded_state_dict()}, checkpoint_id=dir)`"
        ) from None
