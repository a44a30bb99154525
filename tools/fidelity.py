"""Fidelity of the cost model: predicted vs measured step time and memory on local gloo ranks.

For each small model (MLP, CNN, transformer; ``benchlib.small_models``) it makes fxpar's own plan
and four forced reference plans (data parallel, Megatron tensor parallel, ZeRO-3, a DP/TP hybrid)
with a profile calibrated on the same ranks right before (``fxpar.calibrate.measure``), runs them
all on those ranks with interleaved timing, and reports per plan the measured and predicted step
time and their relative error, the median absolute relative error, and Spearman's rank
correlation (per model and over all plans); also the predicted per-device memory against the
measured peak of tensor memory. Plans of one model with the same strategy for every node (fxpar's
own plan is often the data-parallel one) are one step: it is compiled and timed once and its times
reported under both names (``same_steps``).

The machine is shared with other jobs, so its speed drifts. Two predictions are reported:

- ``before``: the plans' own prediction, under the profile calibrated before the runs (what a user
  of ``python -m fxpar calibrate`` gets);
- ``during``: the same plans priced under a profile measured interleaved with the runs (a short
  calibration pass at the start of every round, pooled), which takes the drift out and leaves the
  error of the model itself.

The step timed is what a plan predicts: the compiled call (forward, backward and the plan's
collectives, as one graph), ``loss.backward()`` and the Adam update with ``zero_grad``. The update
is also timed apart and compared with ``CostModel.optimizer_time`` (under the profile measured
during the runs). Each time is the median over steps of the slowest rank.

    python tools/fidelity.py [--profile PATH] [--rounds 10] [--steps 2] [--out docs/bench] [--no-kernels]
    python tools/fidelity.py --reprice RUN_DIR    # an earlier run's plans, priced by the current model

A run writes, besides the tables, ``fidelity-raw.json`` (the plans, the raw calibration
measurements and every rank's step times), which ``--reprice`` reads. Before planning, the ranks
also time the models' matmul and convolution kernels by signature (``fxpar.calibrate.measure_kernels``,
what ``python -m fxpar calibrate --model`` records) into the profile; ``--no-kernels`` prices them
by the class rates alone.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from fxpar.calibrate import (  # noqa: E402
    Sizes,
    build_profile,
    kernel_calls,
    measure,
    measure_kernels,
    merge_measurements,
    with_measured_kernels,
)
from fxpar.cost import CostModel  # noqa: E402
from fxpar.plan import Plan  # noqa: E402
from fxpar.planner import capture_and_annotate  # noqa: E402

ROUND_SIZES = Sizes(repeats=2, warmup_s=0.0)  # the calibration pass of every round (right after steps: warm)


def _plan_all(models: list[str], cluster: fxpar.Cluster, nprocs: int) -> dict[str, str]:
    plans = {}
    for name in models:
        model, inputs = benchlib.build(name)
        for kind, plan in benchlib.reference_plans(model, inputs, cluster, (nprocs,)).items():
            plans[f"{name}/{kind}"] = plan.to_json()
            print(f"planned {name}/{kind}: predicted {plan.predicted_step_s * 1e3:.2f} ms "
                  f"({benchlib.param_summary(plan)})", flush=True)
    return plans


def same_steps(plans: dict[str, str]) -> dict[str, str]:
    """``"model/kind"`` -> the first key of the same model whose plan has the same strategy for every
    node and recomputes the same nodes (itself where there is none): the same step under two names,
    compiled and timed once, so that two runs of one step are not read as a difference between plans."""
    out: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, text in plans.items():
        plan = Plan.from_json(text)
        sig = (key.split("/")[0], tuple(sorted((n, s.label()) for n, s in plan.strategies.items())), tuple(plan.recompute),
               plan.input_placement, plan.batch_norm)
        out[key] = seen.setdefault(sig, key)
    return out


def _measure_here(rank: int, sizes: Sizes, verbose: bool) -> list[dict]:
    """Calibration measurements of every rank, taken on the running ranks; every rank gets all."""
    mine = measure(rank, sizes, verbose=verbose)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _rank(rank: int, models: list[str], profile_json: str | None, rounds: int, steps: int, kernels: bool) -> dict:
    warnings.simplefilter("ignore")
    world = dist.get_world_size()
    raw_before = None if profile_json else _measure_here(rank, Sizes(), True)
    before = fxpar.Cluster.from_json(profile_json) if profile_json else build_profile(raw_before, name="calibrated", wall_s=0)
    if kernels and not profile_json:
        # The step's own matmul and convolution kernels, every per-device shape any plan may give
        # them, timed on all ranks at once: planning prices those by their measured times.
        calls = {}
        for name in models:
            calls.update(kernel_calls(capture_and_annotate(*benchlib.build(name)), (world,)))
        if rank == 0:
            print(f"timing {len(calls)} matmul and convolution kernels of the models' steps", flush=True)
        every: list = [None] * world
        dist.all_gather_object(every, measure_kernels(calls))
        before = with_measured_kernels(before, every)
    box = [_plan_all(models, before, world) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    plans: dict[str, str] = box[0]
    runners, opt_runners, memory = {}, {}, {}
    same = same_steps(plans)
    for key, plan_json in plans.items():
        if same[key] != key:
            continue
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
        runners[key] = whole
        opt_runners[key] = (step, update)
    if rank == 0:
        print(f"timing {len(runners)} plans: {rounds} rounds of {steps} steps each, a calibration pass per round", flush=True)
    during: list = []
    times = benchlib.interleave(runners, rounds=rounds, steps=steps,
                                before_round=lambda: during.append(_measure_here(rank, ROUND_SIZES, False)))
    opt_times = {}
    for key, (step, update) in opt_runners.items():
        ts = []
        for _ in range(steps):
            step()
            ts.append(benchlib.timed_step(update))
        opt_times[key] = ts
    for key, first in same.items():
        times[key], opt_times[key], memory[key] = times[first], opt_times[first], memory[first]
    return {"times": times, "opt_times": opt_times, "memory": memory, "plans": plans, "profile": before.to_json(),
            "raw_before": raw_before, "raw_during": merge_measurements(during)}


def optimizer_prediction(plan: Plan, model_name: str, cluster: fxpar.Cluster) -> float:
    model, _ = benchlib.build(model_name)
    cm = CostModel(cluster, plan.mesh_shape)
    return sum(cm.optimizer_time(p, plan.param_specs[n], plan.optimizer) for n, p in model.named_parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", help="a calibrated profile (default: calibrate on the ranks right before the runs)")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench"))
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="time the models' matmul and convolution kernels by signature before planning "
                         "(DeviceSpec.measured_kernel_s, as `calibrate --model` does; on by default)")
    ap.add_argument("--reprice", metavar="RUN_DIR",
                    help="run nothing: price the plans a run saved in RUN_DIR (fidelity-raw.json) with the current "
                         "cost model under that run's profile before the runs, against its measured times")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.reprice:
        print(reprice_run(Path(args.reprice)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    profile_json = fxpar.Cluster.load(args.profile).to_json() if args.profile else None
    load_before = _load()
    results = fxpar.launch(_rank, args.nprocs, args.models.split(","), profile_json, args.rounds, args.steps,
                           args.kernels, timeout_s=3600.0)
    first = results[0]
    plans = {k: Plan.from_json(v) for k, v in first["plans"].items()}
    before = fxpar.Cluster.from_json(first["profile"])
    during = build_profile(first["raw_during"], name="during the runs", wall_s=0)
    # The kernels timed before the runs price the same kernels under the profile during them.
    during = dataclasses.replace(during, device=dataclasses.replace(
        during.device, measured_kernel_s=before.device.measured_kernel_s))
    before.save(out / "fidelity-profile-before.json")
    during.save(out / "fidelity-profile-during.json")
    # What re-pricing the same plans under another cost model or profile needs (no reruns): the
    # plans, the raw calibration measurements, and every rank's step times.
    (out / "fidelity-raw.json").write_text(json.dumps({
        "plans": first["plans"], "raw_before": first["raw_before"], "raw_during": first["raw_during"],
        "times": [r["times"] for r in results]}, default=str))
    graphs: dict = {}
    rows = []
    same = same_steps(first["plans"])
    for key, plan in plans.items():
        model_name, kind = key.split("/")
        if model_name not in graphs:
            graphs[model_name] = capture_and_annotate(*benchlib.build(model_name))
        measured = benchlib.slowest_rank_median([r["times"][key] for r in results])
        predicted_during = benchlib.reprice(graphs[model_name], plan, during).predicted_step_s
        rows.append({
            "model": model_name, "plan": kind, "params": benchlib.param_summary(plan),
            # The plan of the same step timed under its first name (its times are that one's).
            **({"same_step_as": same[key].split("/")[1]} if same[key] != key else {}),
            "predicted_s": plan.predicted_step_s, "compute_s": plan.compute_s, "comm_s": plan.comm_s,
            "measured_s": measured, "error": plan.predicted_step_s / measured - 1,
            "during_predicted_s": predicted_during, "during_error": predicted_during / measured - 1,
            "optimizer_predicted_s": optimizer_prediction(plan, model_name, during),
            "optimizer_measured_s": benchlib.slowest_rank_median([r["opt_times"][key] for r in results]),
            "memory_predicted": plan.memory_bytes, "memory_measured": max(r["memory"][key] for r in results),
        })
    report = summarize(rows)
    report.update({"profile_before": before.source, "drift": drift(before, during), "nprocs": args.nprocs,
                   "rounds": args.rounds, "steps": args.steps, "load_average_before": load_before,
                   "load_average_after": _load(), "wall_s": round(time.perf_counter() - start, 1),
                   "torch": torch.__version__})
    (out / "fidelity.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "fidelity.md").write_text(table + "\n")
    print(table)


def reprice_run(run: Path) -> str:
    """The summary table of an earlier run's plans priced again by the current cost model (under
    the profile that run calibrated before its runs), against the step times it measured."""
    raw = json.loads((run / "fidelity-raw.json").read_text())
    before = fxpar.Cluster.load(run / "fidelity-profile-before.json")
    graphs: dict = {}
    rows = []
    for key, plan_json in raw["plans"].items():
        model_name, kind = key.split("/")
        if model_name not in graphs:
            graphs[model_name] = capture_and_annotate(*benchlib.build(model_name))
        plan = benchlib.reprice(graphs[model_name], Plan.from_json(plan_json), before)
        measured = benchlib.slowest_rank_median([times[key] for times in raw["times"]])
        rows.append({"model": model_name, "plan": kind, "predicted_s": plan.predicted_step_s, "measured_s": measured})
        print(f"{key}: measured {measured * 1e3:.2f} ms, predicted {plan.predicted_step_s * 1e3:.2f} ms "
              f"({plan.compute_s * 1e3:.2f} + {plan.comm_s * 1e3:.2f}), {plan.predicted_step_s / measured - 1:+.0%}")
    stats = _stats(rows, "predicted_s")
    lines = ["| model | median abs. error | Spearman | fxpar's plan fastest: predicted / measured | measured behind the fastest |",
             "|---|---|---|---|---|"]
    for m, st in [*stats["per_model"].items(), ("all plans", stats["all"])]:
        lines.append(f"| {m} | {st['median_abs_error']:.0%} | {st['spearman']:.2f} | "
                     f"{'yes' if st['fxpar_fastest_predicted'] else 'no'} / {'yes' if st['fxpar_fastest_measured'] else 'no'} | "
                     f"{st['fxpar_behind_fastest']:+.1%} |")
    return "\n".join(lines)


def drift(before: fxpar.Cluster, during: fxpar.Cluster) -> dict[str, float]:
    """during / before for the profile's main figures."""
    b, a = before.device, during.device
    return {
        "matmul FLOP/s": (a.peak_flops * a.efficiencies("matmul")[0]) / (b.peak_flops * b.efficiencies("matmul")[0]),
        "elementwise bandwidth": (a.memory_bandwidth * a.efficiencies("elementwise")[1])
        / (b.memory_bandwidth * b.efficiencies("elementwise")[1]),
        "per-op overhead": a.kernel_overhead_s / b.kernel_overhead_s,
        "all-reduce bandwidth": during.links[0].figures("all_reduce")[0] / before.links[0].figures("all_reduce")[0],
        "overlap": (a.overlap_efficiency, b.overlap_efficiency),
    }


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _stats(rows: list[dict], pred: str) -> dict:
    def one(rs: list[dict]) -> dict:
        return {"median_abs_error": statistics.median(abs(r[pred] / r["measured_s"] - 1) for r in rs),
                "spearman": benchlib.spearman([r[pred] for r in rs], [r["measured_s"] for r in rs]),
                # Per model (a tie with the same step under another name counts as fastest).
                "fxpar_fastest_predicted": all(r[pred] <= min(q[pred] for q in rs if q["model"] == r["model"])
                                               for r in rs if r["plan"] == "fxpar"),
                "fxpar_fastest_measured": all(r["measured_s"] <= min(q["measured_s"] for q in rs if q["model"] == r["model"])
                                              for r in rs if r["plan"] == "fxpar"),
                # How far fxpar's plan was measured behind the fastest plan of its model (the worst model).
                "fxpar_behind_fastest": max(r["measured_s"] / min(q["measured_s"] for q in rs if q["model"] == r["model"]) - 1
                                            for r in rs if r["plan"] == "fxpar")}

    out = {"all": one(rows), "per_model": {}}
    for m in dict.fromkeys(r["model"] for r in rows):
        out["per_model"][m] = one([r for r in rows if r["model"] == m])
    return out


def summarize(rows: list[dict]) -> dict:
    mem_err = [r["memory_predicted"] / r["memory_measured"] - 1 for r in rows]
    opt_err = [r["optimizer_predicted_s"] / r["optimizer_measured_s"] - 1 for r in rows]
    return {"rows": rows, "before": _stats(rows, "predicted_s"), "during": _stats(rows, "during_predicted_s"),
            "memory_median_abs_error": statistics.median(abs(e) for e in mem_err),
            "memory_error_range": [min(mem_err), max(mem_err)],
            "optimizer_median_abs_error": statistics.median(abs(e) for e in opt_err)}


def markdown(rep: dict) -> str:
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    lines = ["| model | plan | parameters | measured ms | predicted ms, profile before (compute + comm) | error "
             "| predicted ms, profile during | error | Adam update pred (during) / meas ms | memory pred / meas MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(
            f"| {r['model']} | {r['plan']}{' (the ' + r['same_step_as'] + ' step)' if 'same_step_as' in r else ''} | {r['params']} | {ms(r['measured_s'])} | {ms(r['predicted_s'])} "
            f"({ms(r['compute_s'])} + {ms(r['comm_s'])}) | {r['error']:+.0%} | {ms(r['during_predicted_s'])} "
            f"| {r['during_error']:+.0%} | {ms(r['optimizer_predicted_s'])} / {ms(r['optimizer_measured_s'])} "
            f"| {mib(r['memory_predicted'])} / {mib(r['memory_measured'])} |")
    lines += ["", "| model | profile | median abs. error | Spearman (5 plans) | fxpar's plan fastest: predicted / measured "
              "| fxpar's plan measured behind the fastest |", "|---|---|---|---|---|---|"]
    for key in ("before", "during"):
        st = rep[key]
        for m, v in [*st["per_model"].items(), ("all plans", st["all"])]:
            lines.append(f"| {m} | {key} | {v['median_abs_error']:.0%} | {v['spearman']:.2f} "
                         f"| {yn(v['fxpar_fastest_predicted'])} / {yn(v['fxpar_fastest_measured'])} "
                         f"| {v['fxpar_behind_fastest']:+.1%} |")
    lo, hi = rep["memory_error_range"]
    d = rep["drift"]
    lines += ["", f"Memory: median absolute error {rep['memory_median_abs_error']:.0%} (from {lo:+.0%} to {hi:+.0%}). "
              f"Adam update: median absolute error {rep['optimizer_median_abs_error']:.0%}.",
              "", "Profile during the runs relative to the one before: " +
              ", ".join(f"{k} x{v:.2f}" for k, v in d.items() if k != "overlap") +
              f"; overlap of async collectives {d['overlap'][1]:.2f} before, {d['overlap'][0]:.2f} during. "
              f"Load average (1, 5, 15 min) before {rep['load_average_before']}, after {rep['load_average_after']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
