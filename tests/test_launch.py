"""``fxpar.launch`` names a rank that fails or dies, without waiting for its timeout."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import pytest
import torch.distributed as dist

import fxpar
from fxpar.launch import RankError


def _rank_one_is_killed(rank: int) -> int:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 waits for a peer that is gone
    return rank


def _rank_one_raises(rank: int) -> int:
    if rank == 1:
        raise KeyError("bad batch")
    dist.barrier()
    return rank


def _rank_one_exits(rank: int) -> int:
    if rank == 1:
        os._exit(3)
    time.sleep(0.1)
    return rank


def test_a_killed_rank_is_named_not_its_peer():
    # The timeout is far longer than the test runs: reaching it would give another message.
    with pytest.raises(RankError, match=r"rank 1 of 2 died from signal SIGKILL \(killed: out of memory"):
        fxpar.launch(_rank_one_is_killed, 2, timeout_s=300)


def test_a_rank_that_raises_is_named_with_its_error():
    with pytest.raises(RankError, match=r"rank 1 of 2 failed: KeyError: 'bad batch'"):
        fxpar.launch(_rank_one_raises, 2, timeout_s=300)


def test_a_rank_that_exits_without_a_result_is_named():
    with pytest.raises(RankError, match=r"rank 1 of 2 exited with status 3 without a result"):
        fxpar.launch(_rank_one_exits, 2, timeout_s=300)


def _environment(rank: int, name: str) -> tuple[str | None, int]:
    return os.environ.get(name), int(os.environ["RANK"])


def test_each_launch_gives_the_ranks_the_callers_environment_as_it_is_then(monkeypatch):
    """The ranks are forked from a server started at an earlier launch (where the platform has
    one): a variable set or removed since must reach them as the caller has it now."""
    name = "FXPAR_TEST_LAUNCH_ENV"
    monkeypatch.setenv(name, "first")
    assert fxpar.launch(_environment, 2, name) == [("first", 0), ("first", 1)]
    monkeypatch.setenv(name, "second")
    assert fxpar.launch(_environment, 2, name) == [("second", 0), ("second", 1)]
    monkeypatch.delenv(name)
    assert fxpar.launch(_environment, 2, name) == [(None, 0), (None, 1)]


def _say(rank: int, text: str) -> int:
    # One write per line: two processes' lines then cannot interleave.
    sys.stdout.write(f"rank {rank} says {text}\n")
    sys.stdout.flush()
    sys.stderr.write(f"rank {rank} warns {text}\n")
    sys.stderr.flush()
    return rank


def _segfault(rank: int) -> int:
    if rank == 1:
        ctypes.string_at(0)  # reads address 0
    dist.barrier()
    return rank


def test_ranks_write_where_the_caller_writes_at_each_launch(capfd):
    """A rank forked from the server writes to the caller's standard output and error as they are
    at this launch (here pytest's capture, set up after the server started at an earlier launch)."""
    fxpar.launch(_environment, 2, "HOME")  # the server is running before the capture below
    capfd.readouterr()
    assert fxpar.launch(_say, 2, "hello") == [0, 1]
    out, err = capfd.readouterr()
    assert sorted(line for line in out.splitlines() if "says" in line) == ["rank 0 says hello", "rank 1 says hello"]
    assert sorted(line for line in err.splitlines() if "warns" in line) == ["rank 0 warns hello", "rank 1 warns hello"]


def test_a_rank_that_crashes_prints_its_python_stack(capfd):
    with pytest.raises(RankError, match=r"rank 1 of 2 died from signal SIGSEGV"):
        fxpar.launch(_segfault, 2, timeout_s=300)
    err = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in err
    assert "in _segfault" in err


def _rank_one_hangs(rank: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def test_a_rank_that_hangs_is_named_with_its_python_stack(capfd):
    with pytest.raises(RankError, match=r"ranks \[1\] gave no result within 3 s"):
        fxpar.launch(_rank_one_hangs, 2, timeout_s=3)
    err = capfd.readouterr().err
    assert "in _rank_one_hangs" in err


def _compile_threads(rank: int) -> int:
    from torch._inductor.async_compile import get_compile_threads

    return get_compile_threads()


def test_ranks_share_the_cores_for_inductors_compile_workers(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    cores = max(1, (os.cpu_count() or 1) // 2)
    assert fxpar.launch(_compile_threads, 2) == [cores, cores]
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    assert fxpar.launch(_compile_threads, 2) == [3, 3]
