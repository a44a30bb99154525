"""What a blocking collective costs inside a step, against the compute between collectives.

Two local gloo ranks run the same compute (``--total-matmuls`` small matmuls, one thread each) cut
into K segments, each segment followed by a blocking all-reduce (``--bytes``, 1 KiB) through
``fxpar.runtime.collectives.DistComm`` (as a rewritten step calls it), for K = 1, 4, 16, 64, and
the same compute without the all-reduces. Per K it prints, from the slowest rank's median over
``--repeats`` repeats (each started after a barrier): the extra time per collective (synced minus
compute-only, over K), the all-reduce alone after a barrier, and each rank's median time inside
the all-reduce calls, which tells waiting for the other rank (one rank's figure high) from time
neither rank computes (both high).

    python tools/in_step_probe.py [--total-matmuls 128] [--repeats 7] [--bytes 1024]

The figures depend on the machine's load: print ``os.getloadavg()`` beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from fxpar.launch import launch  # noqa: E402

SEGMENTS = (1, 4, 16, 64)


def _probe(rank: int, total_matmuls: int, repeats: int, nbytes: int) -> dict:
    from torch.distributed.device_mesh import DeviceMesh

    from fxpar.runtime.collectives import DistComm

    torch.set_num_threads(1)
    comm = DistComm(DeviceMesh("cpu", list(range(dist.get_world_size()))))
    a, b = torch.randn(128, 512), torch.randn(512, 512)
    x = torch.randn(max(1, nbytes // 4))
    out: dict = {}

    def run(k: int, sync: bool) -> float:
        inside = 0.0
        for _ in range(k):
            for _ in range(total_matmuls // k):
                torch.mm(a, b)
            if sync:
                start = time.perf_counter()
                comm.all_reduce(x, 0)
                inside += time.perf_counter() - start
        return inside

    for k in SEGMENTS:
        for sync in (False, True):
            run(k, sync)
            times, inside = [], []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                inside.append(run(k, sync))
                times.append(time.perf_counter() - start)
            out[(k, sync)] = (times, inside)
    alone = []
    for _ in range(4 * repeats):
        dist.barrier()
        start = time.perf_counter()
        comm.all_reduce(x, 0)
        alone.append(time.perf_counter() - start)
    out["alone"] = (alone, alone)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-matmuls", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bytes", type=int, default=1024, help="bytes per all-reduce")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = launch(_probe, 2, args.total_matmuls, args.repeats, args.bytes)

    def slowest(key) -> float:
        return benchlib.slowest_rank_median([r[key][0] for r in results])

    alone = slowest("alone")
    print(f"1-minute load before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; all-reduce of {args.bytes} bytes alone {alone * 1e3:.3f} ms")
    print("| segments | ms per segment | compute only ms | with all-reduces ms | extra per all-reduce ms | ms inside the all-reduces, rank 0 / rank 1 |")
    print("|---|---|---|---|---|---|")
    for k in SEGMENTS:
        compute, synced = slowest((k, False)), slowest((k, True))
        inside = " / ".join(f"{statistics.median(r[(k, True)][1]) * 1e3:.2f}" for r in results)
        print(f"| {k} | {compute / k * 1e3:.2f} | {compute * 1e3:.1f} | {synced * 1e3:.1f} | {(synced - compute) / k * 1e3:.3f} | {inside} |")


if __name__ == "__main__":
    main()
