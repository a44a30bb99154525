"""Recomputation against torch.utils.checkpoint and FSDP2, on the same local gloo ranks in one
interleaved run.

One GPT of ``fxpar.models`` and a global batch are given a device memory of ``--budget-fraction``
(0.7) of the least any plan needs keeping every activation (``min_memory`` of the planning problem,
the figure ``InfeasiblePlanError`` reports without recomputation): a budget where no plan fits
without recomputing, the one where a user reaches for ``torch.utils.checkpoint`` on every block.
fxpar plans for a cluster whose device memory is that budget, so its solver must choose what to
recompute; that it finds a plan shows the budget is at or above what it needs with recomputation
(planning raises ``InfeasiblePlanError`` otherwise). Runners, each with ``torch.optim.Adam`` (the same settings for all):

- ``fxpar``: ``fxpar.compile`` with that plan (Inductor codegen, the default);
- ``fxpar_eager``: the same plan with ``codegen="eager"`` (its ops run one by one, as the
  baselines' do: what of the difference is Inductor's);
- ``ddp_ckpt``: ``DistributedDataParallel`` with every block wrapped in
  ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` (the hand-written policy);
- ``fsdp2``: ``fully_shard`` on every block and on the root, no checkpointing;
- ``ddp``: plain ``DistributedDataParallel``, no checkpointing (reference).

The step time is the median over steps of the slowest rank (``benchlib.interleave``). The peak is
one step's (forward, backward, update, zero_grad; after a first step made the Adam state) under
the tensor tracker of ``benchlib.measured_peak_bytes``, the largest over ranks: fxpar's measured
on the ``fxpar_eager`` module (the tracker sees the ops one by one; under Inductor it would see
only the compiled kernels' outputs) and given to both fxpar rows, the baselines' on the very
modules that are timed. DDP runs with ``gradient_as_bucket_view=True``, so its gradients are views of its
buckets, which DDP allocates before the step: those storages are counted as resident. A runner
fits when its measured peak is at most the budget.

    python tools/recompute_bench.py [--profile PATH] [--rounds 7] [--steps 3] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

import fxpar  # noqa: E402
from fxpar.cost import CostModel  # noqa: E402
from fxpar.models import GPT, GPTConfig  # noqa: E402
from fxpar.plan import Plan  # noqa: E402
from fxpar.planner import capture_and_annotate, plan_graph  # noqa: E402
from fxpar.solve.ilp import build_problem, min_memory  # noqa: E402
from fxpar.solve.strategies import all_strategies  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("fxpar", "fxpar_eager", "ddp_ckpt", "fsdp2", "ddp")
NAMES = {"fxpar": "fxpar (recompute chosen)", "fxpar_eager": "fxpar, codegen=\"eager\"", "ddp_ckpt": "DDP + checkpoint every block",
         "fsdp2": "FSDP2, no checkpoint", "ddp": "DDP, no checkpoint"}
MODEL = "gpt"
CONFIG = GPTConfig(vocab_size=512, seq_len=128, n_layer=4, n_head=4, d_model=128)
BATCH = 16
LR = 1e-4


def _models() -> dict:
    return {MODEL: (lambda: GPT(CONFIG), BATCH)}


class Checkpointed(nn.Module):
    """A block whose forward runs under ``torch.utils.checkpoint`` (non-reentrant): its
    activations are recomputed in the backward pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def _runner(kind: str, plan_json: str, rank: int, world: int, codegen: str = "inductor"):
    """(step, resident tensors besides the parameters, buffers, Adam state and inputs, module)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model, inputs = benchlib.build(MODEL, _models())
    local = [t.chunk(world)[rank].contiguous() for t in inputs]
    if kind == "fxpar":
        module = fxpar.compile(model, inputs, plan=Plan.from_json(plan_json), codegen=codegen)
    elif kind in ("ddp", "ddp_ckpt"):
        if kind == "ddp_ckpt":
            model.blocks = nn.ModuleList(Checkpointed(b) for b in model.blocks)
        module = DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        module = fully_shard(model, mesh=mesh)
    params = list(module.parameters())
    opt = torch.optim.Adam(params, lr=LR)

    def step() -> None:
        module(*local).backward()
        opt.step()
        opt.zero_grad()

    # A first step makes the Adam state (and, for DDP, shows the bucket views the gradients live in).
    module(*local).backward()
    grads = [p.grad for p in params if p.grad is not None] if kind.startswith("ddp") else []
    opt.step()
    opt.zero_grad()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    resident = params + list(module.buffers()) + state + local + grads
    return step, resident


def _rank(rank: int, plan_json: str, rounds: int, steps: int) -> dict:
    warnings.simplefilter("ignore")
    world = dist.get_world_size()
    peaks = {}
    runners = {}
    for kind in RUNNERS:
        if kind == "fxpar_eager":
            step, resident = _runner("fxpar", plan_json, rank, world, codegen="eager")
        else:
            step, resident = _runner(kind, plan_json, rank, world)
        if kind != "fxpar":
            peaks[kind] = benchlib.measured_peak_bytes(step, resident)
        runners[kind] = step
    # The tracker sees the eager module's ops; the Inductor module runs the same plan.
    peaks["fxpar"] = peaks["fxpar_eager"]
    dist.barrier()
    times = benchlib.interleave(runners, rounds=rounds, steps=steps)
    return {"times": times, "peaks": peaks}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(ROOT / "docs" / "bench" / "fidelity_compiled-profile-before.json"),
                    help="a calibrated cluster profile (default: the one the fidelity benchmark calibrated)")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-fraction", type=float, default=0.7,
                    help="the device memory as a fraction of the least any plan needs without recomputation")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    args = ap.parse_args()
    if not 0 < args.budget_fraction < 1:
        ap.error(f"--budget-fraction {args.budget_fraction} must lie between 0 and 1 (below 1, no plan fits without recomputing)")
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = dataclasses.replace(fxpar.Cluster.load(args.profile), num_devices=args.nprocs)
    mesh = (args.nprocs,)
    model, inputs = benchlib.build(MODEL, _models())
    gm = capture_and_annotate(model, inputs)
    problem = build_problem(gm, all_strategies(gm, mesh), CostModel(cluster, mesh), optimizer="adam")
    high = min_memory(problem)
    budget = args.budget_fraction * high
    t0 = time.perf_counter()
    plan, _ = plan_graph(gm, cluster=cluster.with_memory(budget), mesh_shape=mesh, optimizer="adam")
    plan_s = time.perf_counter() - t0
    print(f"least memory keeping every activation {high / 2**20:.3f} MiB; "
          f"budget {budget / 2**20:.3f} MiB; fxpar's plan: predicted {plan.predicted_step_s * 1e3:.2f} ms, "
          f"{plan.memory_bytes / 2**20:.3f} MiB, recomputes {len(plan.recompute)} ops, planned in {plan_s:.1f} s", flush=True)
    print(f"timing {', '.join(RUNNERS)} on {args.nprocs} gloo ranks, {args.rounds} interleaved rounds of {args.steps} steps",
          flush=True)
    load_before = _load()
    results = fxpar.launch(_rank, args.nprocs, plan.to_json(), args.rounds, args.steps)
    load_after = _load()
    rows = []
    for kind in RUNNERS:
        med = benchlib.slowest_rank_median([r["times"][kind] for r in results])
        peak = max(r["peaks"][kind] for r in results)
        rows.append({"runner": kind, "step_s": med, "peak_bytes": peak, "fits": peak <= budget})
    by = {r["runner"]: r for r in rows}
    for r in rows:
        r["fxpar_over_this"] = by["fxpar"]["step_s"] / r["step_s"]
    report = {"model": f"GPT({CONFIG}), global batch {BATCH}", "nprocs": args.nprocs, "rounds": args.rounds,
              "steps": args.steps, "optimizer": "torch.optim.Adam (defaults)", "profile": cluster.name,
              "min_memory_keep_all_bytes": high, "budget_fraction": args.budget_fraction, "budget_bytes": budget,
              "plan": {"predicted_step_s": plan.predicted_step_s, "predicted_peak_bytes": plan.memory_bytes,
                       "params": benchlib.param_summary(plan), "recompute": list(plan.recompute), "plan_s": round(plan_s, 2)},
              "rows": rows, "load_average_before": load_before, "load_average_after": load_after,
              "wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    benchlib.write_report(out, "recompute_bench", report, markdown)


def markdown(rep: dict) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = ["| runner | step ms | measured peak MiB / rank | fits the budget | fxpar / this |", "|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {NAMES[r['runner']]} | {r['step_s'] * 1e3:.1f} | {mib(r['peak_bytes'])} | "
                     f"{'yes' if r['fits'] else 'no'} | {r['fxpar_over_this']:.2f} |")
    p = rep["plan"]
    rec = ", ".join(p["recompute"]) or "nothing"
    lines.append(f"\n{rep['model']} on {rep['nprocs']} gloo ranks, {rep['rounds']} interleaved rounds of {rep['steps']} steps; "
                 f"{rep['optimizer']} for every runner. Budget {mib(rep['budget_bytes'])} MiB per device, {rep['budget_fraction']} of "
                 f"the least any plan needs keeping every activation ({mib(rep['min_memory_keep_all_bytes'])} MiB). fxpar's plan (parameters {p['params']}): predicted "
                 f"{mib(p['predicted_peak_bytes'])} MiB, {p['predicted_step_s'] * 1e3:.1f} ms; it recomputes "
                 f"{len(p['recompute'])} ops: {rec}. Load average (1, 5, 15 min) before {rep['load_average_before']}, "
                 f"after {rep['load_average_after']}; wall {rep['wall_s']} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
