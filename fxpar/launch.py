"""``fxpar.launch``: run a function on N local processes with a gloo group, without torchrun."""

from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank of ``fxpar.launch`` raised; the message names the rank and carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, nprocs: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_RANK=str(rank))
    # The ranks share the machine's cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=nprocs)
        result = fn(rank, *args)
        # Serialized here, so tensors travel by value, not by shared memory that dies with the rank.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException as exc:  # noqa: BLE001  (reported to the parent with the rank named)
        queue.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, timeout_s: float = 600.0) -> list[Any]:
    """Call ``fn(rank, *args)`` in ``nprocs`` spawned processes with a gloo process group set up;
    return the results in rank order. ``fn`` must be importable (defined at a module's top level)."""
    if nprocs < 1:
        raise ValueError(f"nprocs is {nprocs}; launch needs at least 1 process")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, fn, args, queue), daemon=False) for r in range(nprocs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(nprocs):
            try:
                rank, ok, value = queue.get(timeout=timeout_s)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in errors]
                raise RankError(f"ranks {dead or 'unknown'} ended without a result within {timeout_s} s") from None
            (results if ok else errors)[rank] = value
            if not ok:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.terminate()
    if errors:
        rank = min(errors)
        raise RankError(f"rank {rank} of {nprocs} failed: {errors[rank]}")
    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(nprocs)]
