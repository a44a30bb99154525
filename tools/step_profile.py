"""Where one training step's time goes: fxpar's module against DDP and DDP + torch.compile on the
same gloo ranks, interleaved, each phase timed on its own (forward, backward, optimizer), plus
fxpar's compiled per-rank graph called alone, and a torch.profiler table of one fxpar step.

    python tools/step_profile.py [--models transformer,mlp] [--profile PATH] [--rounds 5] [--steps 3]
        [--families "tensor parallel"] [--trace] [--batch-norm local]

``--families`` adds, per model, fxpar running the best plan of each named family
(``benchlib.forced_plans``) and torch's tensor parallelism (``vs_torch``'s ``tp`` runner), to tell
the plan's share of a gap from the runtime's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

import fxpar  # noqa: E402
from fxpar.plan import Plan  # noqa: E402


def _phased(module, local, opt):
    """A step that records its forward, backward and optimizer seconds."""
    record: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def step() -> None:
        t0 = time.perf_counter()
        loss = module(*local)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        record["forward"].append(t1 - t0)
        record["backward"].append(t2 - t1)
        record["optimizer"].append(t3 - t2)

    return step, record


def _rank(rank: int, jobs: list[tuple[str, str, dict]], rounds: int, steps: int, trace: bool,
          batch_norm: str = "global") -> dict:
    from torch.nn.parallel import DistributedDataParallel

    warnings.simplefilter("ignore")
    world = dist.get_world_size()
    out = {}
    for name, plan_json, family_plans in jobs:
        runners, records = {}, {}
        for family, text in family_plans.items():
            model, inputs = benchlib.build(name)
            module = fxpar.compile(model, inputs, plan=Plan.from_json(text))
            opt = torch.optim.Adam(module.parameters(), lr=1e-4, fused=True)
            runners[f"fxpar[{family}]"], records[f"fxpar[{family}]"] = _phased(module, [t.chunk(world)[rank] for t in inputs], opt)
        if family_plans:
            import vs_torch

            runners["torch_tp"] = vs_torch._runner("tp", name, {}, rank, world, "fused")
        for kind in ("fxpar", "ddp", "ddp_compile"):
            model, inputs = benchlib.build(name)
            local = [t.chunk(world)[rank] for t in inputs]
            if kind == "fxpar":
                module = benchlib.compile_with(model, inputs, Plan.from_json(plan_json), batch_norm=batch_norm)
                fx_module, fx_local = module, local
            else:
                module = DistributedDataParallel(model)
                if kind == "ddp_compile":
                    module = torch.compile(module, dynamic=False)
            opt = torch.optim.Adam(module.parameters(), lr=1e-4, fused=True)
            runners[kind], records[kind] = _phased(module, local, opt)
            if kind == "fxpar":
                fx_opt = opt
            elif kind == "ddp_compile":
                ddpc = (module, local, opt)
        variant = fx_module._fxpar.main
        params = [p._local_tensor for p in fx_module._params()]
        rest = [*fx_module._states(), *fx_local]
        runners["fxpar_graph"] = lambda: variant.run(params, rest)
        times = benchlib.interleave(runners, rounds=rounds, steps=steps)
        for kind, rec in records.items():
            for phase, ts in rec.items():
                times[f"{kind}.{phase}"] = ts[-len(times[kind]):]
        out[name] = times
        if trace:
            from torch.profiler import ProfilerActivity, profile

            for label, (module, local, opt) in (("", (fx_module, fx_local, fx_opt)), ("/ddp_compile", ddpc)):
                step, _ = _phased(module, local, opt)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        step()
                if rank == 0:
                    out[name + "/profile" + label] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench" / "fidelity-profile-during.json"))
    ap.add_argument("--models", default="transformer,mlp")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--families", default="", help="comma-separated plan families of benchlib.family_force")
    ap.add_argument("--trace", action="store_true",
                    help="also print torch.profiler's tables of 3 fxpar steps and 3 DDP + torch.compile steps (rank 0)")
    ap.add_argument("--batch-norm", default="global", choices=("global", "local"),
                    help="fxpar's batch-norm statistics: global (the default) or local (DDP's per-device ones)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cluster = fxpar.Cluster.load(args.profile)
    jobs = []
    for name in args.models.split(","):
        model, inputs = benchlib.build(name)
        plan = fxpar.plan(model, inputs, cluster=cluster, mesh_shape=(args.nprocs,), batch_norm=args.batch_norm)
        print(f"{name}: {benchlib.param_summary(plan)}", flush=True)
        families = [f for f in args.families.split(",") if f]
        forced = {}
        if families:
            from fxpar.planner import capture_and_annotate

            gm = capture_and_annotate(model, inputs)
            forced = {f: p.to_json() for f, p in benchlib.forced_plans(gm, model, cluster, (args.nprocs,), families).items()
                      if f != "fxpar"}
        jobs.append((name, plan.to_json(), forced))
    import os

    load = os.getloadavg()[0]
    results = fxpar.launch(_rank, args.nprocs, jobs, args.rounds, args.steps, args.trace, args.batch_norm, timeout_s=300)
    for name, _, _ in jobs:
        print(f"\n{name} (ms; median over steps; per rank)")
        keys = [k for k in results[0][name] if not k.startswith("fxpar_graph")] + ["fxpar_graph"]
        for k in keys:
            meds = [statistics.median(r[name][k]) * 1e3 for r in results]
            print(f"  {k:24s} " + "  ".join(f"{m:6.2f}" for m in meds)
                  + ("" if "." in k else f"   slowest-rank median {benchlib.slowest_rank_median([r[name][k] for r in results]) * 1e3:.2f}"))
        for label in ("", "/ddp_compile"):
            if name + "/profile" + label in results[0]:
                print(f"\n{name}: torch.profiler, 3 steps of {'DDP + torch.compile' if label else 'fxpar'}, rank 0")
                print(results[0][name + "/profile" + label])
    print(f"\nload average (1 min) before {load:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
