"""Planning time of every model of ``fxpar/models`` (the test configurations of
``tests/runtime/model_fns.py``) and of the third-party zoo (``tests/zoo/zoo_fns.py``, with each
config's default dropout) on 2-D meshes: model to plan after capture (``plan_graph``, the default
options: simplified problem, recomputation allowed, 60 s limit, ``cpu-local`` preset).

    python tools/zoo_plan_times.py [--meshes 2x2,2x4] [--only NAME] [--highs presolve=off] [--out docs/results/zoo_plan_times.json]

Prints one line per case (wall and process CPU seconds of ``plan_graph``, status, gap, predicted
step) with the 1-minute load average before it, and writes the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fxpar.planner import capture_and_annotate, plan_graph  # noqa: E402
from tools.plan_scale import _solver, with_highs_options  # noqa: E402
from tests.runtime import model_fns as M  # noqa: E402
from tests.zoo import zoo_fns as Z  # noqa: E402


def cases() -> list[tuple[str, object, tuple]]:
    out = [(f"HF {name}", lambda name=name: Z.make_model(name, dropout=None), Z.batch(name, 0)) for name in Z.MODELS]
    for name in M.MODELS:
        model = M.make_model(name)
        out.append((f"{name} (fxpar)", lambda model=model: model, M.batch(name, 0, model)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--meshes", default="2x2,2x4")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--out", default=str(ROOT / "docs/results/zoo_plan_times.json"))
    parser.add_argument("--highs", default="", help="HiGHS options, e.g. presolve=off (passed as solver HIGHS:presolve=off)")
    args = parser.parse_args()
    solver = with_highs_options("HIGHS", args.highs)
    meshes = [tuple(int(s) for s in m.split("x")) for m in args.meshes.split(",")]
    results = []
    for name, make, inputs in cases():
        if args.only and args.only not in name:
            continue
        gm = capture_and_annotate(make(), inputs)
        for mesh in meshes:
            load = os.getloadavg()[0]
            wall, cpu = time.perf_counter(), time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with _solver(solver):
                    plan, _ = plan_graph(gm, mesh_shape=mesh)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            r = {"name": name, "mesh": list(mesh), "load_avg_1min": load, "wall_s": wall, "cpu_s": cpu,
                 "status": plan.solver["status"], "gap": plan.solver["gap"], "predicted_step_s": plan.predicted_step_s,
                 "variables": plan.solver["num_variables"], "recompute": len(plan.recompute)}
            results.append(r)
            print(f"| {name} | {'x'.join(map(str, mesh))} | {load:.1f} | {wall:.1f} s | {cpu:.2f} s | {r['status']}, gap "
                  f"{r['gap']:.2%} | {r['predicted_step_s'] * 1e3:.4f} ms |", flush=True)
    if not args.only and not args.highs:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
