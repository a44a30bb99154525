"""Where the CNN's step time goes under fxpar on 2 gloo ranks: the compiled and the eager step of
fxpar's plan, the compiled step with per-device statistics, DDP, DDP over batch norm with global
statistics (``vs_torch.CpuSyncBatchNorm``), the batch-norm statistics collectives alone (as many,
and as large, as the plan's rank graph issues) and as many one-element collectives (gloo's
latency), interleaved as in ``vs_torch.py``; Adam ``fused=True`` everywhere.

    python tools/cnn_gap.py [--profile PATH] [--rounds 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

import fxpar  # noqa: E402
from fxpar.plan import Plan  # noqa: E402
from fxpar.rules import norm  # noqa: E402


def _rank(rank: int, plan_json: str, rounds: int, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    warnings.simplefilter("ignore")
    world = dist.get_world_size()
    runners, compiled = {}, {}
    import vs_torch

    for codegen, batch_norm in (("inductor", "global"), ("eager", "global"), ("inductor", "local")):
        model, inputs = benchlib.build("cnn")
        # The same strategies under either statistics: the plan relabelled, not planned again.
        plan = dataclasses.replace(Plan.from_json(plan_json), batch_norm=batch_norm)
        module = fxpar.compile(model, inputs, plan=plan, codegen=codegen, batch_norm=batch_norm)
        compiled[codegen] = compiled.get(codegen, module)
        key = f"fxpar_{codegen}" + ("_local_bn" if batch_norm == "local" else "")
        runners[key] = _step(module, [t.chunk(world)[rank] for t in inputs])
    model, inputs = benchlib.build("cnn")
    runners["ddp"] = _step(DistributedDataParallel(model), [t.chunk(world)[rank] for t in inputs])
    model, inputs = benchlib.build("cnn")
    runners["ddp_syncbn"] = _step(DistributedDataParallel(vs_torch.CpuSyncBatchNorm.convert(model)),
                                  [t.chunk(world)[rank] for t in inputs])
    # The statistics collectives of the plan's batch norms: an all-gather of 2C values per forward,
    # an all-reduce of 2C per backward, each waited for at once.
    local = compiled["eager"].local_graph
    bn = [n for n in local.graph.nodes if n.target is norm.batch_norm_global_stats]
    num_channels = [m.num_features for m in benchlib.build("cnn")[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(num_channels) == len(bn), (len(num_channels), len(bn))
    group = compiled["eager"].mesh.group_names[0]
    funcol = torch.ops._c10d_functional

    def stats_only() -> None:
        for c in num_channels:
            funcol.wait_tensor(funcol.all_gather_into_tensor(torch.ones(2 * c), world, group))  # forward
            funcol.wait_tensor(funcol.all_reduce(torch.ones(2 * c), "sum", group))  # backward

    def latency_only() -> None:
        for _ in num_channels:
            funcol.wait_tensor(funcol.all_gather_into_tensor(torch.ones(1), world, group))
            funcol.wait_tensor(funcol.all_reduce(torch.ones(1), "sum", group))

    runners["bn_collectives"] = stats_only
    runners["one_element_collectives"] = latency_only
    times = benchlib.interleave(runners, rounds=rounds, steps=steps)
    times["num_bn"] = [float(len(bn))]
    times["compile_s"] = [compiled["inductor"].compile_s]
    return times


def _step(module, local):
    opt = torch.optim.Adam(module.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        module(*local).backward()
        opt.step()
        opt.zero_grad()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench" / "fidelity-profile-during.json"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cluster = fxpar.Cluster.load(args.profile)
    model, inputs = benchlib.build("cnn")
    plan = fxpar.plan(model, inputs, cluster=cluster, mesh_shape=(2,))
    results = fxpar.launch(_rank, 2, plan.to_json(), args.rounds, args.steps)
    import os

    print(f"load average before {os.getloadavg()[0]:.2f}")
    for key in ("fxpar_inductor", "fxpar_eager", "fxpar_inductor_local_bn", "ddp", "ddp_syncbn", "bn_collectives",
                "one_element_collectives"):
        print(f"{key}: {benchlib.slowest_rank_median([r[key] for r in results]) * 1e3:.1f} ms")
    print(f"batch norms {int(results[0]['num_bn'][0])}, compile {max(r['compile_s'][0] for r in results):.1f} s; "
          f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
