"""Modelled comparison on GPU presets: fxpar's plan against the standard strategies, all priced by
the same cost model.

For each model and preset the predicted step time of fxpar's plan is set against the best plan of
each family (forced through ``fxpar.plan(..., force=...)``, the rest completed by the solver):

- data parallel: every parameter replicated;
- FSDP / ZeRO-3: every parameter sharded over all devices, compute as in data parallel (gathered
  for use, gradients reduce-scattered);
- Megatron tensor parallel over all devices (column / row pairs; convolutions split by output
  channel);
- the best DP x TP hybrid: Megatron on the inner mesh axis, data parallel on the outer one, over
  the 2-D meshes of the preset ((2, 4) and (4, 2) on one node of 8; (2, 8) = nodes x GPUs on two).

fxpar does not choose the mesh shape, so its plan here is the best of its plans on the same
meshes the families use. All families lie in fxpar's search space, so fxpar's plan is never
predicted slower unless the solver stops at its time limit before the optimum (the table shows
the solver status).

    python tools/modelled.py [--models mlp,cnn,transformer] [--presets ...] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

import fxpar  # noqa: E402
from fxpar.errors import InfeasiblePlanError  # noqa: E402
from fxpar.models import GPT, MLP, GPTConfig, ResNet18  # noqa: E402
from fxpar.planner import capture_and_annotate  # noqa: E402

MODELS = {
    "mlp": (lambda: MLP((1024, 4096, 4096, 1024)), 1024),
    "cnn": (lambda: ResNet18(num_classes=1000, image_size=224), 256),
    "transformer": (lambda: GPT(GPTConfig(n_layer=4, seq_len=512)), 32),
}
PRESETS = {
    "v100-nvlink-8": [(8,), (2, 4), (4, 2)],
    "a100-nvlink-8": [(8,), (2, 4), (4, 2)],
    "h100-2node-16": [(2, 8)],
}
FAMILIES = ("data parallel", "zero-3", "tensor parallel", "dp x tp")


def compare(name: str, preset: str, time_limit_s: float) -> dict:
    ctor, batch = MODELS[name]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ctor()
    inputs = tuple(model.example_inputs(batch))
    gm = capture_and_annotate(model, inputs)
    cluster = fxpar.preset(preset)
    meshes = PRESETS[preset]
    full = meshes[0]
    best: dict[str, tuple[float, tuple, str]] = {}
    per_mesh: list[dict] = []
    for mesh in meshes:
        # One node: the pure families on the 1-D mesh, the hybrid on the 2-D ones. Two nodes: all
        # families on (nodes, GPUs).
        if len(cluster.links) == 1:
            families = [f for f in FAMILIES if f != "dp x tp"] if mesh == full else ["dp x tp"]
        else:
            families = list(FAMILIES)
        try:
            plans = benchlib.forced_plans(gm, model, cluster, mesh, families, time_limit_s=time_limit_s, skip_timeouts=True)
        except InfeasiblePlanError as exc:
            print(f"  {name} on {preset} mesh {list(mesh)}: {exc}", flush=True)
            continue
        per_mesh.append({"mesh": list(mesh), **{f: {"predicted_s": p.predicted_step_s, "solver": p.solver.get("status", "")}
                                                 for f, p in plans.items()}})
        for family, plan in plans.items():
            status = plan.solver.get("status", "")
            print(f"  {name:<11} {preset:<14} {str(list(mesh)):<8} {family:<16} {plan.predicted_step_s * 1e3:9.2f} ms  "
                  f"{plan.memory_bytes / 2**30:6.2f} GiB  {status}", flush=True)
            if family not in best or plan.predicted_step_s < best[family][0]:
                best[family] = (plan.predicted_step_s, mesh, status)
    row = {"model": name, "preset": preset, "batch": batch, "per_mesh": per_mesh}
    for family, (t, mesh, status) in best.items():
        row[family] = {"predicted_s": t, "mesh": list(mesh), "solver": status}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--time-limit", type=float, default=20.0, help="solver limit per plan (s)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [compare(m, p, args.time_limit) for m in args.models.split(",") for p in args.presets.split(",")]
    report = {"rows": rows, "time_limit_s": args.time_limit, "wall_s": round(time.perf_counter() - start, 1),
              "torch": torch.__version__}
    (out / "modelled.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "modelled.md").write_text(table + "\n")
    print(table)


def markdown(rep: dict) -> str:
    heads = ["data parallel", "zero-3", "tensor parallel", "dp x tp"]
    lines = ["| model | preset | fxpar ms (mesh) | " + " | ".join(f"{h} ms (x)" for h in heads) + " | never slower |",
             "|---|---|---|" + "---|" * len(heads) + "---|"]
    for r in rep["rows"]:
        if "fxpar" not in r:
            lines.append(f"| {r['model']} | {r['preset']} | no plan (memory or time limit) | " + " | ".join("" for _ in heads) + " | |")
            continue
        f = r["fxpar"]["predicted_s"]
        cells = []
        for h in heads:
            if h not in r:
                cells.append("no plan (memory or time limit)")
                continue
            t = r[h]["predicted_s"]
            cells.append(f"{t * 1e3:.2f} ({t / f:.2f}x)")
        ok = all(r[h]["predicted_s"] >= f * (1 - 1e-9) for h in heads if h in r)
        solver = "" if r["fxpar"]["solver"] == "optimal" else f", {r['fxpar']['solver']}"
        lines.append(f"| {r['model']} | {r['preset']} | {f * 1e3:.2f} {tuple(r['fxpar']['mesh'])}{solver} | "
                     + " | ".join(cells) + f" | {'yes' if ok else 'NO'} |")
    lines.append("\n(x) = the family's predicted step time divided by fxpar's: how much faster fxpar's plan is predicted to be.")
    slower = []
    for r in rep["rows"]:
        for m in r.get("per_mesh", []):
            if "fxpar" not in m:
                continue
            for h in heads:
                if h in m and m[h]["predicted_s"] < m["fxpar"]["predicted_s"] * (1 - 1e-9):
                    slower.append(f"{r['model']} on {r['preset']} mesh {tuple(m['mesh'])}: fxpar {m['fxpar']['predicted_s'] * 1e3:.2f} ms "
                                  f"({m['fxpar']['solver']}) vs {h} {m[h]['predicted_s'] * 1e3:.2f} ms")
    if slower:
        lines.append("\nMeshes where fxpar's own plan on that mesh is predicted slower than a forced family on the same mesh:\n")
        lines += [f"- {x}" for x in slower]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
