"""Fidelity of the memory model: each plan's predicted peak per device against the measured peak.

The plans are those of ``tools/fidelity.py`` (fxpar's own and the four forced references per model,
its ``_plan_all``), planned under one profile (``--profile``, by default the one the fidelity run
calibrated). Each plan runs on ``--nprocs`` gloo ranks, compiled with ``codegen="eager"``: the
tracker (``fxpar.runtime.memory.LiveTensorBytes``, a dispatch mode) sees the ops that run one by
one, and Inductor's compiled kernels allocate outside it. One training step (the call, the
backward that hands the gradients to the parameters, an Adam update and ``zero_grad``) is measured
after a first step has made the optimizer state. The peak is what the rank holds: its parameters'
local pieces, buffers, Adam state and batch slice, each storage once, plus the peak of the storage
the step's ops make (views and aliases share their base's storage and count once). The report
gives per plan the prediction, the measured peak (the larger of the ranks), their ratio and the op
at which the measured peak happened.

    python tools/memory_fidelity.py [--profile PATH] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import fidelity  # noqa: E402

import fxpar  # noqa: E402
from fxpar.plan import Plan  # noqa: E402
from fxpar.runtime.memory import measure_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.10


def measure_plan(model: torch.nn.Module, inputs: tuple, plan: Plan, *, optimizer: str = "adam") -> dict:
    """Measured peak bytes of one training step of ``model`` under ``plan`` on this rank (eager
    code), with the op at the peak: ``{"peak": bytes, "resident": bytes, "at": op name}``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    compiled = fxpar.compile(model, inputs, plan=plan, codegen="eager")
    params = list(compiled.parameters())
    opt = torch.optim.Adam(params, lr=1e-4) if optimizer == "adam" else torch.optim.SGD(params, lr=1e-4)
    local = [t.chunk(world)[rank].contiguous() for t in inputs]

    def step() -> None:
        compiled(*local).backward()
        opt.step()
        opt.zero_grad()

    step()  # makes the optimizer state
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return measure_step(step, params + list(compiled.buffers()) + state + local)


def _rank(rank: int, plans: dict[str, str]) -> dict:
    warnings.simplefilter("ignore")
    out = {}
    for key, text in plans.items():
        model, inputs = benchlib.build(key.split("/")[0])
        out[key] = measure_plan(model, inputs, Plan.from_json(text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(ROOT / "docs" / "bench" / "fidelity-profile-before.json"),
                    help="the profile the plans are made under (it decides fxpar's own plan)")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    cluster = fxpar.Cluster.load(args.profile)
    plans = fidelity._plan_all(args.models.split(","), cluster, args.nprocs)
    results = fxpar.launch(_rank, args.nprocs, plans)
    rows = []
    for key, text in plans.items():
        plan = Plan.from_json(text)
        per_rank = [r[key] for r in results]
        top = max(per_rank, key=lambda m: m["peak"])
        model_name, kind = key.split("/")
        rows.append({"model": model_name, "plan": kind, "params": benchlib.param_summary(plan),
                     "recomputed": len(plan.recompute), "predicted": plan.memory_bytes, "measured": top["peak"],
                     "measured_per_rank": [m["peak"] for m in per_rank], "resident": top["resident"],
                     "peak_at": top["at"], "error": plan.memory_bytes / top["peak"] - 1})
    errors = [r["error"] for r in rows]
    report = {"rows": rows, "median_abs_error": statistics.median(abs(e) for e in errors),
              "error_range": [min(errors), max(errors)], "within": sum(abs(e) <= TOLERANCE for e in errors),
              "tolerance": TOLERANCE, "nprocs": args.nprocs, "profile": cluster.source, "codegen": "eager",
              "wall_s": round(time.perf_counter() - start, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
              "torch": torch.__version__}
    benchlib.write_report(Path(args.out), "memory_fidelity", report, markdown)


def markdown(rep: dict) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = ["| model | plan | parameters | predicted MiB | measured MiB (resident) | error | measured peak at |",
             "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['model']} | {r['plan']} | {r['params']} | {mib(r['predicted'])} "
                     f"| {mib(r['measured'])} ({mib(r['resident'])}) | {r['error']:+.1%} | {r['peak_at']} |")
    lo, hi = rep["error_range"]
    lines += ["", f"{rep['within']} of {len(rep['rows'])} plans within {rep['tolerance']:.0%}; median absolute error "
              f"{rep['median_abs_error']:.1%}, from {lo:+.1%} to {hi:+.1%}. {rep['nprocs']} gloo ranks, "
              f"codegen={rep['codegen']!r}, profile {rep['profile']!r}; torch {rep['torch']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
