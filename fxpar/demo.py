"""The main job: plan an MLP for local CPU ranks, print the plan, train it, report speed."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

import fxpar
from fxpar.models import MLP

DIMS = (256, 1024, 1024, 10)


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: the label is the largest of the first 10 features."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(size, DIMS[0], generator=g)
    return x, x[:, : DIMS[-1]].argmax(dim=1)


def _train(rank: int, global_batch: int, num_steps: int, plan_json: str) -> dict:
    torch.manual_seed(0)
    world = dist.get_world_size()
    model = MLP(DIMS)
    plan = fxpar.Plan.from_json(plan_json)
    compiled = fxpar.compile(model, batch(0, global_batch), plan=plan)
    opt = torch.optim.Adam(compiled.parameters(), lr=3e-3)
    losses, times = [], []
    for step in range(num_steps):
        x, y = batch(step, global_batch)
        dist.barrier()
        start = time.perf_counter()
        loss = compiled(x.chunk(world)[rank], y.chunk(world)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    # Inductor compiles on the first call; its seconds are reported apart from the step times.
    return {"losses": losses, "times": times, "compile_s": compiled.compile_s, "codegen": compiled.codegen}


def main(nprocs: int = 2, num_steps: int = 8, global_batch: int = 64) -> None:
    cluster = fxpar.preset("cpu-local", num_devices=nprocs)
    model = MLP(DIMS)
    plan = fxpar.plan(model, batch(0, global_batch), cluster=cluster, mesh_shape=(nprocs,))
    print(plan.explain())
    print(f"\ntraining {num_steps} steps of MLP{list(DIMS)} (global batch {global_batch}) on {nprocs} local gloo ranks ...")
    results = fxpar.launch(_train, nprocs, global_batch, num_steps, plan.to_json())
    losses = results[0]["losses"]
    for step, loss in enumerate(losses):
        print(f"step {step}: loss {loss:.4f}")
    # The first step includes compilation and the next warm-up; the slowest rank sets the pace.
    per_step = [max(r["times"][i] for r in results) for i in range(num_steps)]
    measured = statistics.median(per_step[2:] if num_steps > 4 else per_step[1:] or per_step)
    compile_s = max(r["compile_s"] for r in results)
    print(f"codegen {results[0]['codegen']}: compile time {compile_s:.2f} s (slowest rank, within the first step, "
          f"which took {per_step[0]:.2f} s)")
    print(
        f"measured step time {measured * 1e3:.2f} ms (median over ranks' slowest), predicted "
        f"{plan.predicted_step_s * 1e3:.2f} ms with the uncalibrated '{cluster.name}' preset "
        f"(ratio {measured / plan.predicted_step_s:.2f})"
    )


HELP = "plan an MLP, print the plan, train it on local CPU ranks"


def add_arguments(parser) -> None:
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")


def run(args) -> None:
    main(args.nprocs, args.steps, args.batch)
