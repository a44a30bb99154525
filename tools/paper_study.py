"""The AlexNet / VGG-16 study: how many GPUs each workload is worth, predicted, and a real CPU check.

For AlexNet and VGG-16 at 224x224, global batches 32..512, on the 'p100-nvlink-8' and 'v100-pcie-4'
presets: predicted throughput and energy per image against the number of GPUs (one capture per
model and batch, planned on every device count), the configuration each objective chooses, and the
per-layer parallelization. The 1- and 8-GPU predictions are compared with published TensorFlow
DGX-1 figures. Then the 32x32 variants train for real on 1 and 2 local CPU ranks (one core each)
and the measured throughput is compared with the predictions of a profile of this machine
(``python -m fxpar calibrate``, run by the script, or ``--cpu-cluster``) and of the uncalibrated
'cpu-local' preset.

Writes the tables between the markers of ``docs/study.md`` and the figure ``docs/study.png``::

    python tools/paper_study.py            # everything, under 5 minutes on a 2-core machine
    python tools/paper_study.py --no-real  # predictions only
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import fxpar
from fxpar.cluster import Cluster, dgx1_tf2017
from fxpar.energy import PowerModel, step_energy
from fxpar.launch import RankError
from fxpar.plan import matmul_kind
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.solve.strategies import node_strategies
from fxpar.sweep import Objective, SweepPoint, SweepResult, choose, fastest, least_energy, sweep_graph, within_energy, within_slowdown

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "study.md"
FIGURE = ROOT / "docs" / "study.png"
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
PRESETS = ("p100-nvlink-8", "v100-pcie-4")
BATCHES = (32, 64, 128, 256, 512)
OPTIMIZER = "sgd"  # what the published benchmarks train with
# Published TensorFlow benchmarks on an NVIDIA DGX-1 (8 x P100 SXM2, FP32, synthetic data, May
# 2017), images/s by number of GPUs, with the per-GPU batch size: the "Benchmarks" page of the
# TensorFlow 1.x performance guide (tensorflow.org/performance/benchmarks).
PUBLISHED = {
    "AlexNet": (512, {1: 2987.0, 2: 5658.0, 4: 10509.0, 8: 17822.0}),
    "VGG-16": (64, {1: 154.0, 2: 295.0, 4: 584.0, 8: 1081.0}),
}


def _robust_min_memory():
    """Keep a sweep going when the planner's explanation of an infeasible mesh fails.

    ``fxpar.solve.ilp.min_memory`` (the least memory any plan needs, for the message of an
    InfeasiblePlanError) can return without a solution on a loaded machine (its 30 s limit) and
    then raises (KeyError / IndexError reading the solver's values). The mesh is excluded either
    way; this retries with a longer limit and otherwise reports the figure as unknown (NaN)."""
    import fxpar.planner as planner

    original = planner.min_memory

    def min_memory(problem, **kw):
        for limit in (kw.pop("time_limit_s", 30.0), 120.0):
            try:
                return original(problem, time_limit_s=limit, **kw)
            except (KeyError, IndexError):
                continue
        return float("nan")

    planner.min_memory = min_memory


def objectives() -> dict[str, Objective]:
    return {"fastest": fastest(), "least energy": least_energy(), "5% slowdown (default)": within_slowdown(0.05)}


@dataclass
class Case:
    model: str
    preset: str
    batch: int
    result: SweepResult
    budget_pick: SweepPoint  # fastest within 1.25 x the least energy per image
    idle_pick: SweepPoint  # least energy when the unused GPUs draw idle power
    seconds: float
    gm: object  # the captured step


def model_on_meta(name: str, image_size: int = 224):
    import fxpar.models as models

    cls = {"AlexNet": models.AlexNet, "VGG-16": models.VGG16}[name]
    with torch.device("meta"):
        model = cls(image_size=image_size)
    return model


def graph_for(name: str, batch: int, image_size: int = 224):
    model = model_on_meta(name, image_size)
    with torch.device("meta"):
        inputs = model.example_inputs(batch)
    return capture_and_annotate(model, inputs)


def run_sweeps() -> list[Case]:
    cases = []
    for name in ("AlexNet", "VGG-16"):
        for batch in BATCHES:
            gm = graph_for(name, batch)
            for preset_name in PRESETS:
                start = time.perf_counter()
                cluster = fxpar.preset(preset_name)
                result = sweep_graph(gm, cluster=cluster, objective=within_slowdown(0.05), optimizer=OPTIMIZER)
                least = min(p.joules_per_sample for p in result.front)
                budget_pick = choose(result.points, within_energy(1.25 * least))
                idle_power = PowerModel.of(cluster.device, count_unused=True)
                repriced = [
                    SweepPoint(p.mesh_shape, p.plan, step_energy(p.plan, batch, idle_power)) if p.feasible else p
                    for p in result.points
                ]
                idle_pick = choose(repriced, least_energy())
                cases.append(Case(name, preset_name, batch, result, budget_pick, idle_pick, time.perf_counter() - start, gm))
                print(f"  {name} batch {batch} on {preset_name}: {len(result.points)} meshes in "
                      f"{cases[-1].seconds:.1f} s", file=sys.stderr)
    return cases


def sweep_table(cases: list[Case], name: str, preset_name: str) -> list[str]:
    sel = [c for c in cases if c.model == name and c.preset == preset_name]
    counts = sorted({p.num_devices for c in sel for p in c.result.points if p.feasible})
    head = "| batch | " + " | ".join(f"{k} GPU{'s' if k > 1 else ''}" for k in counts) + " |"
    lines = [head, "|---|" + "---|" * len(counts)]
    for c in sel:
        by_k = {p.num_devices: p for p in c.result.points if p.feasible}
        front = {id(p) for p in c.result.front}
        cells = []
        for k in counts:
            p = by_k.get(k)
            if p is None:
                cells.append("excluded")
                continue
            mark = "**" if p is c.result.chosen else ""
            cells.append(f"{mark}{p.samples_per_s:,.0f} img/s, {p.joules_per_sample:.3f} J{mark}{'' if id(p) in front else ' (dominated)'}")
        lines.append(f"| {c.batch} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in sel:
        for p in c.result.excluded:
            if p.num_devices in counts:  # device counts that divide no batch are left out of the table
                reason = p.excluded.split("; use ")[0].replace("nan TiB", "(unknown: the solver found no bound in time)")
                lines.append(f"- excluded, batch {c.batch} on {p.num_devices} GPU(s): {reason}")
    return lines


def scaling_table(cases: list[Case]) -> list[str]:
    """Speed-up and change of energy per image on all GPUs against the fewest GPUs that fit."""
    lines = ["| model | preset | batch | fewest GPUs that fit | all GPUs: speed-up | all GPUs: J/image change |",
             "|---|---|---|---|---|---|"]
    for c in cases:
        ok = sorted((p for p in c.result.points if p.feasible), key=lambda p: p.num_devices)
        lo, hi = ok[0], ok[-1]
        lines.append(f"| {c.model} | {c.preset} | {c.batch} | {lo.num_devices} | {hi.samples_per_s / lo.samples_per_s:.2f}x "
                     f"on {hi.num_devices // lo.num_devices}x the GPUs | {hi.joules_per_sample / lo.joules_per_sample - 1:+.1%} |")
    return lines


def choice_table(cases: list[Case]) -> list[str]:
    lines = ["| model | preset | batch | fastest | least energy | 5% slowdown (default) | fastest within 1.25x least J | least energy, unused GPUs idle |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        picks = [choose(c.result.points, o) for o in objectives().values()] + [c.budget_pick, c.idle_pick]
        cells = [f"{p.num_devices} ({p.samples_per_s:,.0f} img/s, {p.joules_per_sample:.3f} J)" for p in picks]
        lines.append(f"| {c.model} | {c.preset} | {c.batch} | " + " | ".join(cells) + " |")
    return lines


def forward_op(gm, fqn: str):
    """The forward convolution or matmul that consumes parameter ``fqn`` (through views)."""
    param = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("fxpar_fqn") == fqn)
    frontier, seen = [param], set()
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen or user.meta.get("fxpar_phase") != "forward":
                continue
            seen.add(user)
            if user.target in (aten.convolution.default, aten.addmm.default, aten.mm.default):
                return user
            if user.meta.get("fxpar_is_view"):
                frontier.append(user)
    return None


def split_of(node, plan) -> str:
    """How the op's work is divided on a 1-D mesh: batch, column, row, channels, partial or replicated."""
    s = plan.strategies[node.name]
    if node.target == aten.convolution.default:
        x, w, out = repr(s.inputs[0][0]), repr(s.inputs[1][0]), repr(s.outputs[0][0])
        if x == "S(0)":
            return "batch"
        if w == "S(0)" and out == "S(1)":
            return "out-channels"
        if out == "P":
            return "in-channels"
        return "replicated" if out == "R" else s.label()
    return {"replicate": "replicated"}.get(matmul_kind(node.target, s, 0), matmul_kind(node.target, s, 0))


def layer_table(cases: list[Case], name: str) -> list[str]:
    """How each weighted layer is split under the all-GPU plan at the smallest and largest batch."""
    cols = []
    for preset_name in PRESETS:
        for batch in (BATCHES[0], BATCHES[-1]):
            c = next(c for c in cases if (c.model, c.preset, c.batch) == (name, preset_name, batch))
            full = max((p for p in c.result.points if p.feasible), key=lambda p: p.num_devices)
            cols.append((f"{preset_name}, batch {batch}, {full.num_devices} GPUs", full.plan, c.gm))
    first = cols[0][1]
    weights = [(fqn, spec) for fqn, spec in first.param_specs.items() if fqn.endswith("weight")]
    lines = ["| layer | " + " | ".join(h for h, _, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for fqn, _ in weights:
        cells = []
        for _, plan, gm in cols:
            node = forward_op(gm, fqn)
            spec = "".join(repr(p) for p in plan.param_specs[fqn])
            cells.append(split_of(node, plan) + (f" (W {spec})" if spec != "R" else ""))
        lines.append(f"| {fqn.removesuffix('.weight')} | " + " | ".join(cells) + " |")
    return lines


def _from_param(node) -> bool:
    """Whether ``node`` is a parameter, or a view of one (t, permute, view: one tensor input)."""
    while node.op == "call_function":
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return node.op == "placeholder" and node.meta.get("fxpar_role") == "param"


def data_parallel(name: str, gm) -> dict[str, str]:
    """TensorFlow's replicated variables, forced: every parameter replicated, and every matmul and
    convolution (forward and backward) on this GPU's slice of the batch, so every weight gradient
    is a partial sum that the all-reduce completes (the solver may not replace a weight's all-reduce
    by gathering the activations and computing the whole layer on every GPU, as it would on its own)."""
    force = {fqn: "R" for fqn, _ in model_on_meta(name).named_parameters()}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default,
                                                              aten.convolution.default, aten.convolution_backward.default):
            continue
        operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
        from_param = [_from_param(a) for a in operands]
        labels = sorted({st.label() for st in node_strategies(node, (8,))})
        fits = [lab for lab in labels
                if all((spec == "R") == param for spec, param in zip(lab.split("->")[0].split(","), from_param))
                and "P" not in lab.split("->")[0].split(",")]
        if len(fits) != 1:
            raise RuntimeError(f"no single data-parallel strategy for %{node.name}: {labels}")
        force[node.name] = fits[0]
    return force


def published_system_rate(name: str, per_gpu: int, k: int) -> float:
    """Images/s of the published setup on k GPUs: the data-parallel plan on ``dgx1_tf2017(k)``."""
    gm = graph_for(name, per_gpu * k)
    force = data_parallel(name, gm) if k > 1 else None
    plan, _ = plan_graph(gm, cluster=dgx1_tf2017(k), mesh_shape=(k,), optimizer=OPTIMIZER, force=force)
    return per_gpu * k / plan.predicted_step_s


def published_table(cases: list[Case]) -> list[str]:
    cluster = fxpar.preset("p100-nvlink-8")
    lines = ["| model | per-GPU batch | GPUs | ring bus bandwidth | predicted img/s, the published setup | error | "
             "fxpar's plan on p100-nvlink-8 | error | published img/s |", "|---|---|---|---|---|---|---|---|---|"]
    predicted: dict[tuple[str, int], float] = {}
    own: dict[tuple[str, int], float] = {}
    flops = {}  # counted training FLOPs per image (forward + backward), from the captured step
    for name, (per_gpu, rates) in PUBLISHED.items():
        gm = next(c.gm for c in cases if (c.model, c.batch) == (name, per_gpu))
        flops[name] = sum(float(n.meta.get("fxpar_flops", 0) or 0) for n in gm.graph.nodes) / per_gpu
        for k, published in rates.items():
            batch = per_gpu * k
            hit = next((c for c in cases if (c.model, c.preset, c.batch) == (name, "p100-nvlink-8", batch)), None)
            point = next((p for p in hit.result.points if p.num_devices == k), None) if hit else None
            if point is not None and point.feasible:
                rate = point.samples_per_s
            else:
                plan, _ = plan_graph(graph_for(name, batch), cluster=cluster, mesh_shape=(k,), optimizer=OPTIMIZER)
                rate = batch / plan.predicted_step_s
            own[name, k] = rate
            predicted[name, k] = published_system_rate(name, per_gpu, k)
            ring = f"{dgx1_tf2017(k).links[0].bandwidth / 1e9:.0f} GB/s" if k > 1 else "-"
            lines.append(f"| {name} | {per_gpu} | {k} | {ring} | {predicted[name, k]:,.0f} | "
                         f"{predicted[name, k] / published - 1:+.0%} | {rate:,.0f} | {rate / published - 1:+.0%} | "
                         f"{published:,.0f} |")
    for name, (per_gpu, rates) in PUBLISHED.items():
        lines.append(f"| {name} | {per_gpu} | scaling 8 vs 1 | | {predicted[name, 8] / predicted[name, 1] / 8:.1%} | "
                     f"{(predicted[name, 8] / predicted[name, 1] - rates[8] / rates[1]) / 8 * 100:+.1f} points | "
                     f"{own[name, 8] / own[name, 1] / 8:.1%} | "
                     f"{(own[name, 8] / own[name, 1] - rates[8] / rates[1]) / 8 * 100:+.1f} points | "
                     f"{rates[8] / rates[1] / 8:.1%} |")
    peak = cluster.device.peak_flops
    lines += ["", "| model | counted training GFLOP / image | TFLOP/s per GPU the published 1-GPU rate implies | P100 FP32 peak |",
              "|---|---|---|---|"]
    for name, (_, rates) in PUBLISHED.items():
        lines.append(f"| {name} | {flops[name] / 1e9:.2f} | {rates[1] * flops[name] / 1e12:.1f} | {peak / 1e12:.1f} |")
    return lines


def figure(cases: list[Case]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fxpar[viz]'): no figure written", file=sys.stderr)
        return False
    panels = [(m, p) for m in ("AlexNet", "VGG-16") for p in PRESETS]
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 6.5), squeeze=False)
    for col, (name, preset_name) in enumerate(panels):
        for c in (c for c in cases if c.model == name and c.preset == preset_name):
            pts = sorted((p for p in c.result.points if p.feasible), key=lambda p: p.num_devices)
            ks = [p.num_devices for p in pts]
            line, = axes[0][col].plot(ks, [p.samples_per_s for p in pts], "o-", ms=3, label=f"batch {c.batch}")
            axes[1][col].plot(ks, [p.joules_per_sample for p in pts], "o-", ms=3, color=line.get_color())
            ch = c.result.chosen
            axes[0][col].plot([ch.num_devices], [ch.samples_per_s], "*", ms=12, color=line.get_color(), mec="k")
            axes[1][col].plot([ch.num_devices], [ch.joules_per_sample], "*", ms=12, color=line.get_color(), mec="k")
        axes[0][col].set_title(f"{name}, {preset_name}", fontsize=10)
        axes[0][col].set_ylabel("predicted images/s")
        axes[1][col].set_ylabel("predicted J/image")
        axes[1][col].set_xlabel("GPUs (star: default choice)")
        for row in axes:
            row[col].set_xticks(sorted({p.num_devices for c in cases if c.model == name and c.preset == preset_name
                                        for p in c.result.points if p.feasible}))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)
    return True


# ---- real runs of the 32x32 variants on local CPU ranks -------------------------------------------

REAL_BATCH = 32


def _real_rank(rank: int, name: str, num_steps: int, plan_json: str) -> list[float]:
    import fxpar.models as models

    # One core per rank whatever the number of ranks, so that a rank is the same "device" on 1 and 2 ranks.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = {"AlexNet": models.AlexNet, "VGG-16": models.VGG16}[name](image_size=32)
    plan = fxpar.Plan.from_json(plan_json)
    inputs = model.example_inputs(REAL_BATCH)
    compiled = fxpar.compile(model, inputs, plan=plan)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.01, momentum=0.9)
    k, times = compiled.num_ranks, []
    x, y = inputs
    for _ in range(num_steps):
        dist.barrier()
        start = time.perf_counter()
        loss = compiled(x.chunk(k)[rank], y.chunk(k)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def calibrated_cpu(path: Path) -> Cluster | None:
    """A profile of this machine from ``python -m fxpar calibrate`` on 2 ranks (None if it fails)."""
    proc = subprocess.run([sys.executable, "-m", "fxpar", "calibrate", "--out", str(path), "--max-ranks", "2"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"calibration failed, predicting with cpu-local only:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return Cluster.load(path)


def real_runs(clusters: list[Cluster], num_steps: int) -> list[str]:
    """Train with the plan made for ``clusters[0]``; predict with every cluster (each its own plan)."""
    names = [c.name for c in clusters]
    lines = ["| model (32x32) | ranks | measured img/s | " + " | ".join(f"predicted, {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for name in ("AlexNet", "VGG-16"):
        for k in (1, 2):
            plans = [plan_graph(graph_for(name, REAL_BATCH, image_size=32), cluster=c, mesh_shape=(k,),
                                optimizer=OPTIMIZER)[0] for c in clusters]
            try:
                results = fxpar.launch(_real_rank, k, name, num_steps, plans[0].to_json())
            except RankError as exc:
                reason = str(exc).splitlines()[0]
                lines.append(f"| {name} | {k} | run failed: {reason} | " + " | ".join(
                    f"{REAL_BATCH / p.predicted_step_s:,.1f}" for p in plans) + " |")
                print(f"  real {name} on {k} rank(s) failed: {reason}", file=sys.stderr)
                continue
            per_step = [max(r[i] for r in results) for i in range(num_steps)]
            measured = REAL_BATCH / statistics.median(per_step[1:])
            cells = []
            for plan in plans:
                predicted = REAL_BATCH / plan.predicted_step_s
                other = " (another plan)" if k > 1 and plan.strategies != plans[0].strategies else ""
                cells.append(f"{predicted:,.1f} (measured/predicted {measured / predicted:.2f}){other}")
            lines.append(f"| {name} | {k} | {measured:,.1f} | " + " | ".join(cells) + " |")
            print(f"  real {name} on {k} rank(s): {measured:.1f} img/s measured; predicted "
                  + ", ".join(f"{REAL_BATCH / p.predicted_step_s:.1f}" for p in plans), file=sys.stderr)
    return lines


REAL_HEADING = "### Measured on local CPU ranks against predicted"


def previous_real_section() -> list[str]:
    """The measured CPU section of the doc as it stands (its lines up to the next section or the
    figure), marked as kept from the run that measured it; empty if there is none."""
    if not DOC.exists() or BEGIN not in DOC.read_text():
        return []
    body = DOC.read_text().split(BEGIN, 1)[1].split(END, 1)[0].splitlines()
    start = next((i for i, line in enumerate(body) if line.startswith(REAL_HEADING)), None)
    if start is None:
        return []
    end = next((i for i in range(start + 1, len(body)) if body[i].startswith(("### ", "![", "Study run time"))), len(body))
    lines = [line for line in body[start:end] if not line.startswith("(Kept from an earlier run")]
    while lines and not lines[-1].strip():
        lines.pop()
    return [lines[0], "", "(Kept from an earlier run of the script: this run skipped the real runs, `--no-real`.)", *lines[1:]]


def write_doc(sections: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Study\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(head + BEGIN + "\n" + "\n".join(sections) + "\n" + END + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-real", action="store_true",
                        help="skip the real CPU runs (the doc keeps the measured section of its last run, dated)")
    parser.add_argument("--steps", type=int, default=6, help="steps per real run (the first is warm-up)")
    parser.add_argument("--cpu-cluster", default=None, help="cluster JSON for the CPU runs (default: calibrate now)")
    parser.add_argument("--no-calibrate", action="store_true", help="predict the CPU runs with cpu-local only")
    args = parser.parse_args()
    warnings.simplefilter("ignore", fxpar.FallbackWarning)
    _robust_min_memory()
    start = time.perf_counter()
    cases = run_sweeps()
    sections = [f"Generated by `python tools/paper_study.py` (optimizer {OPTIMIZER}; every figure is a prediction "
                "of the cost model unless marked measured).", ""]
    for name in ("AlexNet", "VGG-16"):
        for preset_name in PRESETS:
            sections += [f"### {name} on {preset_name}: predicted throughput and energy per image", "",
                         *sweep_table(cases, name, preset_name), ""]
    sections += ["### Scaling and energy on all GPUs", "", *scaling_table(cases), ""]
    sections += ["### Chosen number of GPUs under each objective", "", *choice_table(cases), ""]
    sections += ["### Per-layer parallelization", "",
                 "How the forward convolution or matmul of each layer is split in the plan on all GPUs: "
                 "*batch* = data parallel (the layer's input is split by samples, the weight replicated, its "
                 "gradient all-reduced); *column* = the weight split by output features (W S(0)); *row* = "
                 "split by input features (W S(1)), partial sums reduced; *out-channels* / *in-channels* the "
                 "same for a convolution; *replicated* = every GPU computes the whole layer.", ""]
    for name in ("AlexNet", "VGG-16"):
        sections += [f"#### {name}", "", *layer_table(cases, name), ""]
    pub_lines = published_table(cases)
    sections += ["### Predicted against published (TensorFlow, DGX-1, 8 x P100)", "", *pub_lines, ""]
    if not args.no_real:
        clusters = [fxpar.preset("cpu-local")]
        if args.cpu_cluster:
            clusters.insert(0, Cluster.load(args.cpu_cluster))
        elif not args.no_calibrate:
            with tempfile.TemporaryDirectory() as tmp:
                profile = calibrated_cpu(Path(tmp) / "profile.json")
            if profile is not None:
                clusters.insert(0, profile)
        load_before = os.getloadavg()[0]
        rows = real_runs(clusters, args.steps)
        sections += [f"### Measured on local CPU ranks against predicted (global batch {REAL_BATCH}, one core per rank)", "",
                     f"{os.cpu_count()} cores; 1-minute load average {load_before:.1f} before the runs and "
                     f"{os.getloadavg()[0]:.1f} after (above the number of ranks, other work shared the cores). "
                     f"Median of {args.steps - 1} steps after one warm-up step, the slowest rank's time per step.", "",
                     *rows, ""]
    else:
        kept = previous_real_section()
        if kept:
            sections += [*kept, ""]
    if figure(cases):
        sections += ["![predicted throughput and energy per image against GPUs](study.png)", ""]
    sections.append(f"Study run time: {time.perf_counter() - start:.0f} s.")
    write_doc(sections)
    print(f"wrote {DOC.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
