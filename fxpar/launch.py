"""``fxpar.launch``: run a function on N local processes with a gloo group, without torchrun."""

from __future__ import annotations

import faulthandler
import io
import os
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import reduction
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


def _context():
    """Where the platform has it (Linux, macOS), processes forked from a server that has imported
    fxpar (and with it torch): a rank starts in milliseconds instead of importing torch for 2-3 s,
    and the server, started at the first launch, serves every later one. The server has run no op
    (so no thread pool exists to be lost in a fork) and no device is initialized in it. Elsewhere
    the ranks are spawned as fresh interpreters."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fxpar"])  # read when the server starts; later calls change nothing
    return ctx


class _CallerFd:
    """One of the caller's file descriptors, handed to a rank when the rank is started (a forked rank
    would otherwise write to the descriptors the server had when it started, wherever those point
    now)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        # Pickled as the rank starts, so multiprocessing sends a duplicate along to the new process.
        return (_rebuilt_fd, (reduction.DupFd(self.fd),))


def _rebuilt_fd(dup) -> int:
    return dup.detach()


def _caller_fds() -> list[_CallerFd | None]:
    """The caller's standard output and error as they are now, where they are open (and where the
    platform hands descriptors to a new process: not on Windows)."""
    if not hasattr(reduction, "DupFd"):
        return [None, None]
    fds = []
    for fd in (1, 2):
        try:
            os.fstat(fd)
            fds.append(_CallerFd(fd))
        except OSError:
            fds.append(None)
    return fds


def _worker(rank: int, nprocs: int, port: int, fn: Callable, args: tuple, queue, env: dict[str, str],
            fds: Sequence[int | None] = (None, None)) -> None:
    # A forked rank writes where the caller writes at this launch, not where the server did.
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), fds):
        if fd is not None:
            os.dup2(fd, target)
            os.close(fd)
    # A rank that crashes (a segmentation fault in a library) prints every thread's Python stack,
    # and so does a rank that hangs, when the launcher gives up on it (``_dump_stacks``).
    faulthandler.enable(all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    # A forked rank has the server's environment: take the caller's, as it is at this launch.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_RANK=str(rank))
    # The ranks share the machine's cores: their kernels' threads, and Inductor's compile workers
    # (on 2 cores and 2 ranks, none: each rank compiles in its own process, as fast there as with
    # a pool of worker processes per rank, and with no worker processes to start or stop).
    cores = max(1, (os.cpu_count() or 1) // nprocs)
    torch.set_num_threads(cores)
    if "TORCHINDUCTOR_COMPILE_THREADS" not in env:
        # Read when Inductor's config is first imported (the server has not imported it; importing
        # it here would cost every rank half a second).
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(cores)
        if "torch._inductor.config" in sys.modules:
            sys.modules["torch._inductor.config"].compile_threads = cores
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


_POLL_S = 0.5  # how often the parent checks that every rank is alive
_GRACE_S = 2.0  # how long a dead rank's last message may take to arrive


def _dump_stacks(procs, ranks: list[int]) -> None:
    """Ask each of ``ranks`` still alive to print every thread's Python stack to standard error
    (its ``faulthandler`` handler for SIGUSR1), and give them a moment to write it."""
    if not hasattr(signal, "SIGUSR1"):
        return
    alive = [procs[r] for r in ranks if procs[r].is_alive()]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    if alive:
        time.sleep(_GRACE_S)


def _died(dead: list[int], procs, nprocs: int) -> str:
    parts = []
    for r in dead:
        code = procs[r].exitcode
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (killed: out of memory, or by another process)" if name == "SIGKILL" else ""
            parts.append(f"rank {r} of {nprocs} died from signal {name}{hint}")
        else:
            parts.append(f"rank {r} of {nprocs} exited with status {code} without a result")
    return "; ".join(parts) + "; the other ranks were stopped"


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, timeout_s: float = 600.0) -> list[Any]:
    """Call ``fn(rank, *args)`` in ``nprocs`` local processes (``_context``) with a gloo process group set up;
    return the results in rank order. ``fn`` must be importable (defined at a module's top level).
    A rank that raises, or dies (killed, out of memory), raises ``RankError`` naming it within
    seconds; the other ranks are then stopped. The ranks write to the caller's standard output and
    error as they are at this call; a rank that crashes (a segmentation fault), or gives no result
    within ``timeout_s``, prints every thread's Python stack to standard error first."""
    if nprocs < 1:
        raise ValueError(f"nprocs is {nprocs}; launch needs at least 1 process")
    ctx = _context()
    queue = ctx.Queue()
    port = _free_port()
    env = dict(os.environ)
    fds = _caller_fds()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, fn, args, queue, env, fds), daemon=False)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < nprocs:
            try:
                rank, ok, value = queue.get(timeout=_POLL_S)
            except queue_mod.Empty:
                # A rank that died without a word (killed, out of memory) is named within seconds,
                # not after the whole timeout, and before its peers fail on the closed connection.
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results and r not in errors]
                if dead:
                    try:  # its last message may still be in flight
                        rank, ok, value = queue.get(timeout=_GRACE_S)
                    except queue_mod.Empty:
                        raise RankError(_died(dead, procs, nprocs)) from None
                elif time.monotonic() > deadline:
                    waiting = [r for r in range(nprocs) if r not in results]
                    _dump_stacks(procs, waiting)
                    raise RankError(f"ranks {waiting} gave no result within {timeout_s} s (their Python stacks "
                                    "are printed to standard error above)") from None
                else:
                    continue
            (results if ok else errors)[rank] = value
            if not ok:
                break
    finally:
        stopped = set()
        for r, p in enumerate(procs):
            p.join(timeout=_GRACE_S if len(results) < nprocs else 30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=_GRACE_S)
                stopped.add(r)
    dead = [r for r, p in enumerate(procs)
            if r not in stopped and p.exitcode not in (None, 0) and r not in results and r not in errors]
    if dead:
        # A rank that died took its peers' connections with it: name it, not the peer that noticed.
        others = "; ".join(f"rank {r} then failed: {errors[r].splitlines()[0]}" for r in sorted(errors))
        raise RankError(_died(dead, procs, nprocs) + (f" ({others})" if others else ""))
    if errors:
        rank = min(errors)
        raise RankError(f"rank {rank} of {nprocs} failed: {errors[rank]}")
    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(nprocs)]
