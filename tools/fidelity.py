"""Fidelity of the cost model: predicted vs measured step time and memory on local gloo ranks.

For each small model (MLP, CNN, transformer; ``benchlib.small_models``) it plans fxpar's own plan
and four forced reference plans (data parallel, Megatron tensor parallel, ZeRO-3, a DP/TP hybrid)
with a profile calibrated on the same ranks right before (``fxpar.calibrate.measure``), runs
all of them on those ranks with interleaved timing, calibrates again afterwards to show how much
the machine drifted meanwhile, and
reports per plan the measured and predicted step time, their relative error, the median absolute
relative error, and Spearman's rank correlation (per model and over all plans); also the
predicted per-device memory against the measured peak of tensor memory.

The step timed is what the plan predicts: the compiled call (forward, backward and the plan's
collectives, as one graph) and ``loss.backward()``. The optimizer update is timed apart and
compared with ``CostModel.optimizer_time``.

    python tools/fidelity.py [--profile PATH] [--rounds 10] [--steps 2] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
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

import fxpar  # noqa: E402
from fxpar.calibrate import Sizes, build_profile, measure  # noqa: E402
from fxpar.cost import CostModel  # noqa: E402
from fxpar.plan import Plan  # noqa: E402
from fxpar.planner import capture_and_annotate  # noqa: E402

QUIET = 0.25  # the lower quartile


def _plan_all(models: list[str], cluster: fxpar.Cluster, nprocs: int) -> dict[str, str]:
    plans = {}
    for name in models:
        model, inputs = benchlib.build(name)
        for kind, plan in benchlib.reference_plans(model, inputs, cluster, (nprocs,)).items():
            plans[f"{name}/{kind}"] = plan.to_json()
            print(f"planned {name}/{kind}: predicted {plan.predicted_step_s * 1e3:.2f} ms "
                  f"({benchlib.param_summary(plan)})", flush=True)
    return plans


def _measure_here(rank: int) -> list[dict]:
    """Calibration measurements of every rank, taken on the running ranks; every rank gets all."""
    mine = measure(rank, Sizes())
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _rank(rank: int, models: list[str], profile_json: str | None, rounds: int, steps: int) -> dict:
    warnings.simplefilter("ignore")
    world = dist.get_world_size()
    # Calibrate on these ranks right before the runs (unless a profile is given), so that the
    # profile sees the machine in the state the measurements will.
    raw_before = None if profile_json else _measure_here(rank)
    before = fxpar.Cluster.from_json(profile_json) if profile_json else build_profile(raw_before, name="calibrated", wall_s=0)
    box = [_plan_all(models, before, world) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    plans: dict[str, str] = box[0]
    runners, opt_runners, memory = {}, {}, {}
    for key, plan_json in plans.items():
        model, inputs = benchlib.build(key.split("/")[0])
        compiled = fxpar.compile(model, inputs, plan=Plan.from_json(plan_json))
        opt = torch.optim.Adam(compiled.parameters(), lr=1e-4)
        local = [t.chunk(world)[rank] for t in inputs]

        def step(c=compiled, x=local):
            c(*x).backward()

        def update(o=opt):
            o.step()
            o.zero_grad()

        step()
        update()  # creates the optimizer state
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        resident = list(compiled.parameters()) + list(compiled.buffers()) + state + local

        def whole(s=step, u=update):
            s()
            u()

        memory[key] = benchlib.measured_peak_bytes(whole, resident)
        runners[key] = step
        opt_runners[key] = (step, update)
    times = benchlib.interleave(runners, rounds=rounds, steps=steps)
    opt_times = {}
    for key, (step, update) in opt_runners.items():
        ts = []
        for _ in range(steps):
            step()
            ts.append(benchlib.timed_step(update))
        opt_times[key] = ts
    # The machine drifts (other jobs): calibrate again to see by how much.
    raw_after = _measure_here(rank)
    return {"times": times, "opt_times": opt_times, "memory": memory, "plans": plans,
            "profile": before.to_json(), "raw_before": raw_before, "raw_after": raw_after}


def optimizer_prediction(plan: Plan, model_name: str) -> float:
    model, _ = benchlib.build(model_name)
    cm = CostModel(plan.cluster, plan.mesh_shape)
    return sum(cm.optimizer_time(p, plan.param_specs[n], plan.optimizer) for n, p in model.named_parameters())


def drift(before: fxpar.Cluster, after: fxpar.Cluster) -> dict[str, float]:
    """after / before for the profile's main figures."""
    b, a = before.device, after.device
    return {
        "matmul FLOP/s": (a.peak_flops * a.efficiencies("matmul")[0]) / (b.peak_flops * b.efficiencies("matmul")[0]),
        "memory bandwidth": a.memory_bandwidth / b.memory_bandwidth,
        "per-op overhead": a.kernel_overhead_s / b.kernel_overhead_s,
        "all-reduce bandwidth": after.links[0].figures("all_reduce")[0] / before.links[0].figures("all_reduce")[0],
        "all-gather bandwidth": after.links[0].figures("all_gather")[0] / before.links[0].figures("all_gather")[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", help="a calibrated profile (default: calibrate on the ranks right before the runs)")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    profile_json = fxpar.Cluster.load(args.profile).to_json() if args.profile else None
    load_before = _load()
    results = fxpar.launch(_rank, args.nprocs, args.models.split(","), profile_json, args.rounds, args.steps)
    first = results[0]
    plans = {k: Plan.from_json(v) for k, v in first["plans"].items()}
    before = fxpar.Cluster.from_json(first["profile"])
    after = build_profile(first["raw_after"], name="after", wall_s=0)
    before.save(out / "fidelity-profile.json")
    # The same measurements read at their lower quartile: the machine at its quieter moments.
    quiet = build_profile(first["raw_before"], name="quiet", wall_s=0, quantile=QUIET) if first["raw_before"] else None
    graphs = {}
    rows = []
    for key, plan in plans.items():
        model_name, kind = key.split("/")
        per_rank = [r["times"][key] for r in results]
        measured = benchlib.slowest_rank_median(per_rank)
        opt_measured = benchlib.slowest_rank_median([r["opt_times"][key] for r in results])
        mem = max(r["memory"][key] for r in results)
        row = {
            "model": model_name, "plan": kind, "params": benchlib.param_summary(plan),
            "predicted_s": plan.predicted_step_s, "compute_s": plan.compute_s, "comm_s": plan.comm_s,
            "measured_s": measured, "error": plan.predicted_step_s / measured - 1,
            "optimizer_predicted_s": optimizer_prediction(plan, model_name), "optimizer_measured_s": opt_measured,
            "memory_predicted": plan.memory_bytes, "memory_measured": mem,
        }
        if quiet is not None:
            if model_name not in graphs:
                graphs[model_name] = capture_and_annotate(*benchlib.build(model_name))
            predicted_q = benchlib.reprice(graphs[model_name], plan, quiet).predicted_step_s
            measured_q = benchlib.slowest_rank_median(per_rank, QUIET)
            row.update({"quiet_predicted_s": predicted_q, "quiet_measured_s": measured_q,
                        "quiet_error": predicted_q / measured_q - 1})
        rows.append(row)
    report = summarize(rows)
    report.update({"profile": before.name, "profile_source": before.source, "drift": drift(before, after),
                   "quiet_quantile": QUIET, "nprocs": args.nprocs, "rounds": args.rounds, "steps": args.steps,
                   "load_average_before": load_before, "load_average_after": _load(),
                   "wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__})
    (out / "fidelity.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "fidelity.md").write_text(table + "\n")
    print(table)


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _stats(rows: list[dict], pred: str, meas: str) -> dict:
    err = [abs(r[pred] / r[meas] - 1) for r in rows]
    out = {"median_abs_error": statistics.median(err),
           "spearman_all": benchlib.spearman([r[pred] for r in rows], [r[meas] for r in rows]), "per_model": {}}
    for m in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == m]
        out["per_model"][m] = {
            "median_abs_error": statistics.median(abs(r[pred] / r[meas] - 1) for r in mine),
            "spearman": benchlib.spearman([r[pred] for r in mine], [r[meas] for r in mine]),
            "fxpar_fastest_measured": min(mine, key=lambda r: r[meas])["plan"] == "fxpar",
            "fxpar_fastest_predicted": min(mine, key=lambda r: r[pred])["plan"] == "fxpar",
        }
    return out


def summarize(rows: list[dict]) -> dict:
    mem_err = [r["memory_predicted"] / r["memory_measured"] - 1 for r in rows]
    rep = {"rows": rows, "median": _stats(rows, "predicted_s", "measured_s"),
           "memory_median_abs_error": statistics.median(abs(e) for e in mem_err),
           "memory_error_range": [min(mem_err), max(mem_err)]}
    if all("quiet_predicted_s" in r for r in rows):
        rep["quiet"] = _stats(rows, "quiet_predicted_s", "quiet_measured_s")
    return rep


def markdown(rep: dict) -> str:
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    quiet = "quiet" in rep
    head = "| model | plan | parameters | predicted ms (compute + comm) | measured ms (median) | error |"
    sep = "|---|---|---|---|---|---|"
    if quiet:
        head += " lower quartile: predicted / measured ms | error |"
        sep += "---|---|"
    lines = [head + " optimizer pred / meas ms | memory pred / meas MiB |", sep + "---|---|"]
    for r in rep["rows"]:
        line = (f"| {r['model']} | {r['plan']} | {r['params']} | {ms(r['predicted_s'])} ({ms(r['compute_s'])} + "
                f"{ms(r['comm_s'])}) | {ms(r['measured_s'])} | {r['error']:+.0%} |")
        if quiet:
            line += f" {ms(r['quiet_predicted_s'])} / {ms(r['quiet_measured_s'])} | {r['quiet_error']:+.0%} |"
        line += (f" {ms(r['optimizer_predicted_s'])} / {ms(r['optimizer_measured_s'])} "
                 f"| {mib(r['memory_predicted'])} / {mib(r['memory_measured'])} |")
        lines.append(line)
    for key, title in (("median", "medians (profile and steps)"), ("quiet", "lower quartiles (profile and steps)")):
        if key not in rep:
            continue
        st = rep[key]
        lines += ["", f"With {title}:", "",
                  "| model | median abs. error | Spearman (5 plans) | fxpar's plan fastest: predicted / measured |",
                  "|---|---|---|---|"]
        for m, v in st["per_model"].items():
            yn = lambda b: "yes" if b else "no"  # noqa: E731
            lines.append(f"| {m} | {v['median_abs_error']:.0%} | {v['spearman']:.2f} "
                         f"| {yn(v['fxpar_fastest_predicted'])} / {yn(v['fxpar_fastest_measured'])} |")
        lines.append(f"| all plans | {st['median_abs_error']:.0%} | {st['spearman_all']:.2f} | |")
    lo, hi = rep["memory_error_range"]
    lines += ["", f"Memory: median absolute error {rep['memory_median_abs_error']:.0%} (from {lo:+.0%} to {hi:+.0%})."]
    drift = ", ".join(f"{k} x{v:.2f}" for k, v in rep["drift"].items())
    lines += ["", f"Drift of the machine between the calibration before the runs and one after them: {drift}. "
              f"Load average (1, 5, 15 min) before {rep['load_average_before']}, after {rep['load_average_after']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
