"""How many devices are worth using: plan on k = 1..N devices, price time and energy, pick one.

The graph is captured once (it does not depend on the mesh) and planned on every mesh shape that
fits the cluster's topology: ``(k,)`` for k = 1..N on a cluster with a single link level, and
``(nodes, devices)`` shapes on a two-level cluster (a ``LinkSpec`` per mesh axis). The global batch
stays the same on every mesh, so fewer devices take a larger share each. A mesh that does not
divide the batch or on which no plan fits device memory is excluded, with the reason kept.

The result is the Pareto front of (step time, energy per step) and the point an ``Objective``
picks from it. The default, ``within_slowdown(0.05)``, takes the least energy among the
configurations at most 5% slower than the fastest: the last devices of a poorly scaling workload
draw full power for almost no speed, and dropping them costs at most 5% of the step time, while
pure least energy usually means one device and gives up most of the speed.

``python -m fxpar sweep`` prints the table and can plot it (the plot needs the ``viz`` extra).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from fxpar.cluster import Cluster
from fxpar.energy import PowerModel, StepEnergy, step_energy
from fxpar.errors import ClusterSpecError, InfeasiblePlanError, ShardingError, SweepError
from fxpar.plan import Plan, _fmt_s
from fxpar.planner import capture_and_annotate, plan_graph



@dataclass(frozen=True)
class Objective:
    """``kind``: "fastest", "least-energy", "energy-budget" (fastest with at most
    ``max_joules_per_sample``) or "slowdown" (least energy at most ``max_slowdown`` slower than the
    fastest, as a fraction: 0.05 is 5%)."""

    kind: str
    max_joules_per_sample: float | None = None
    max_slowdown: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fastest", "least-energy", "energy-budget", "slowdown"):
            raise SweepError(f"unknown objective {self.kind!r}; use fastest, least-energy, energy-budget or slowdown")
        if self.kind == "energy-budget" and not (self.max_joules_per_sample or 0) > 0:
            raise SweepError(f"energy-budget needs max_joules_per_sample > 0, got {self.max_joules_per_sample}")
        if self.kind == "slowdown" and not (self.max_slowdown is not None and self.max_slowdown >= 0):
            raise SweepError(f"slowdown needs max_slowdown >= 0 (0.05 = 5% slower), got {self.max_slowdown}")

    def describe(self) -> str:
        if self.kind == "energy-budget":
            return f"fastest within {self.max_joules_per_sample:g} J/sample"
        if self.kind == "slowdown":
            return f"least energy within {self.max_slowdown:.0%} of the fastest"
        return self.kind


def fastest() -> Objective:
    return Objective("fastest")


def least_energy() -> Objective:
    return Objective("least-energy")


def within_energy(max_joules_per_sample: float) -> Objective:
    return Objective("energy-budget", max_joules_per_sample=max_joules_per_sample)


def within_slowdown(max_slowdown: float = 0.05) -> Objective:
    return Objective("slowdown", max_slowdown=max_slowdown)


DEFAULT_OBJECTIVE = within_slowdown(0.05)


@dataclass
class SweepPoint:
    mesh_shape: tuple[int, ...]
    plan: Plan | None = None
    energy: StepEnergy | None = None
    excluded: str | None = None  # why no plan exists on this mesh

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape)

    @property
    def feasible(self) -> bool:
        return self.excluded is None

    @property
    def step_s(self) -> float:
        return self.energy.step_s

    @property
    def joules_per_step(self) -> float:
        return self.energy.joules_per_step

    @property
    def joules_per_sample(self) -> float:
        return self.energy.joules_per_sample

    @property
    def samples_per_s(self) -> float:
        return self.energy.samples_per_s


def pareto_front(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """The feasible points no other point beats in both step time and energy, fastest first (of
    exact ties in both, the one with fewer devices)."""
    ranked = sorted((p for p in points if p.feasible), key=lambda p: (p.step_s, p.joules_per_step, p.num_devices))
    front: list[SweepPoint] = []
    for p in ranked:
        if not front or p.joules_per_step < front[-1].joules_per_step:
            front.append(p)
    return front


def choose(points: Sequence[SweepPoint], objective: Objective) -> SweepPoint:
    """The point ``objective`` picks (always one of the Pareto front)."""
    front = pareto_front(points)
    if not front:
        raise SweepError("no configuration is feasible, so there is nothing to choose; see the excluded reasons")
    if objective.kind == "fastest":
        return front[0]
    if objective.kind == "least-energy":
        return front[-1]
    if objective.kind == "energy-budget":
        within = [p for p in front if p.joules_per_sample <= objective.max_joules_per_sample]
        if not within:
            least = front[-1]
            raise SweepError(
                f"no configuration stays within {objective.max_joules_per_sample:g} J/sample; the least is "
                f"{least.joules_per_sample:.4g} J/sample on mesh {list(least.mesh_shape)}; raise the budget"
            )
        return within[0]
    limit = front[0].step_s * (1 + objective.max_slowdown)
    return [p for p in front if p.step_s <= limit][-1]


@dataclass
class SweepResult:
    points: list[SweepPoint]  # every mesh tried, in the order tried
    front: list[SweepPoint]
    chosen: SweepPoint
    objective: Objective
    global_batch: int
    cluster: Cluster

    @property
    def excluded(self) -> list[SweepPoint]:
        return [p for p in self.points if not p.feasible]

    def table(self) -> str:
        lines = [
            f"sweep on {self.cluster.name} ({self.cluster.num_devices} x {self.cluster.device.name}), global batch "
            f"{self.global_batch}, objective: {self.objective.describe()}",
            f"{'devices':>7}  {'mesh':<10} {'step time':>11} {'samples/s':>11} {'J/sample':>10}  {'Pareto':<6}  chosen",
        ]
        front = {id(p) for p in self.front}
        for p in sorted((p for p in self.points if p.feasible), key=lambda p: (p.num_devices, p.mesh_shape)):
            lines.append(
                f"{p.num_devices:>7}  {str(list(p.mesh_shape)):<10} {_fmt_s(p.step_s):>11} {p.samples_per_s:>11.1f} "
                f"{p.joules_per_sample:>10.4g}  {'yes' if id(p) in front else '':<6}  {'<--' if p is self.chosen else ''}"
            )
        lines += [f"excluded {list(p.mesh_shape)}: {p.excluded}" for p in self.excluded]
        return "\n".join(lines)


def candidate_meshes(cluster: Cluster, *, devices_per_node: int | None = None) -> list[tuple[int, ...]]:
    """Mesh shapes on 1..N devices that fit the cluster's link levels (see the module docstring)."""
    n = cluster.num_devices
    if len(cluster.links) == 1:
        return [(k,) for k in range(1, n + 1)]
    if len(cluster.links) != 2:
        raise ClusterSpecError(
            f"cluster {cluster.name!r} has {len(cluster.links)} link levels; the sweep handles one or two "
            "(nodes, devices per node); pass meshes=[...] explicitly"
        )
    per_node = devices_per_node or cluster.extra.get("devices_per_node")
    if not per_node or n % per_node:
        raise ClusterSpecError(
            f"cluster {cluster.name!r} has two link levels (nodes, devices per node) but the number of devices "
            f"per node is {per_node!r}, which must divide its {n} devices; pass devices_per_node=... "
            "(--devices-per-node) or put it in the cluster's extra={'devices_per_node': ...}"
        )
    return [(a, b) for a in range(1, n // per_node + 1) for b in range(1, per_node + 1)]


def _global_batch(gm: GraphModule) -> int:
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("fxpar_role") == "input"]
    if not inputs or not inputs[0].meta["val"].dim():
        raise ShardingError("the captured step has no batched input (dim 0 of the first input is the batch)")
    return int(inputs[0].meta["val"].shape[0])


def sweep_graph(
    gm: GraphModule,
    *,
    cluster: Cluster,
    objective: Objective | None = None,
    power: PowerModel | None = None,
    meshes: Sequence[Sequence[int]] | None = None,
    devices_per_node: int | None = None,
    optimizer: str = "adam",
    time_limit_s: float = 60.0,
    strict: bool = False,
) -> SweepResult:
    """Plan an already captured step (``fxpar.planner.capture_and_annotate``) on every candidate
    mesh; ``meshes`` replaces the candidates."""
    objective = objective or DEFAULT_OBJECTIVE
    power = power or PowerModel.of(cluster.device)
    batch = _global_batch(gm)
    shapes = [tuple(int(s) for s in m) for m in meshes] if meshes is not None else candidate_meshes(
        cluster, devices_per_node=devices_per_node)
    # Every mesh must be planned from the graph as captured, as a fresh capture in fxpar.compile
    # will be; planning may annotate node.meta (a rule fills in outputs an op does not compute),
    # so each node's metadata is restored after each plan.
    saved = [(n, dict(n.meta)) for n in gm.graph.nodes]
    points = []
    for mesh in shapes:
        try:
            plan, _ = plan_graph(gm, cluster=cluster, mesh_shape=mesh, optimizer=optimizer,
                                 time_limit_s=time_limit_s, strict=strict)
        except (InfeasiblePlanError, ShardingError) as exc:
            points.append(SweepPoint(mesh, excluded=f"{type(exc).__name__}: {exc}"))
            continue
        finally:
            for node, meta in saved:
                node.meta = dict(meta)
        points.append(SweepPoint(mesh, plan, step_energy(plan, batch, power, cluster_devices=cluster.num_devices)))
    front = pareto_front(points)
    if not front:
        reasons = "; ".join(f"{list(p.mesh_shape)}: {p.excluded}" for p in points[:3])
        raise InfeasiblePlanError(f"no mesh of cluster {cluster.name!r} has a plan ({reasons})")
    return SweepResult(points, front, choose(points, objective), objective, batch, cluster)


def sweep(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, cluster: Cluster, **kwargs) -> SweepResult:
    """Capture ``model``'s training step once on ``example_inputs`` (the global batch; the meta
    device works) and sweep it: see ``sweep_graph`` for the keyword arguments."""
    return sweep_graph(capture_and_annotate(model, example_inputs), cluster=cluster, **kwargs)


def plot(result: SweepResult, path: str, *, title: str | None = None) -> None:
    """Throughput and energy per sample against devices, as a PNG (needs matplotlib: the viz extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SweepError("plotting needs matplotlib, which is not installed: pip install 'fxpar[viz]'") from None
    pts = sorted((p for p in result.points if p.feasible), key=lambda p: (p.num_devices, p.mesh_shape))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax2 = ax.twinx()
    xs = [p.num_devices for p in pts]
    ax.plot(xs, [p.samples_per_s for p in pts], "o-", color="tab:blue", label="samples/s")
    ax2.plot(xs, [p.joules_per_sample for p in pts], "s--", color="tab:red", label="J/sample")
    c = result.chosen
    ax.plot([c.num_devices], [c.samples_per_s], "*", ms=16, color="gold", mec="k", label="chosen")
    ax.set_xlabel("devices")
    ax.set_ylabel("samples/s (predicted)", color="tab:blue")
    ax2.set_ylabel("J/sample (predicted)", color="tab:red")
    ax.set_title(title or f"{result.cluster.name}, global batch {result.global_batch}: {result.objective.describe()}")
    ax.set_xticks(sorted({p.num_devices for p in pts}))
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HELP = "plan on 1..N devices, print the time/energy table and the chosen configuration"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="mlp", help="mlp, alexnet or vgg16 (built on the meta device)")
    parser.add_argument("--dims", default="1024,4096,4096,10", help="MLP layer sizes, comma-separated")
    parser.add_argument("--image-size", type=int, default=224, help="alexnet/vgg16 input size (224 or 32)")
    parser.add_argument("--batch", type=int, default=512, help="global batch size (the same on every mesh)")
    parser.add_argument("--cluster", default="p100-nvlink-8", help="preset name or a cluster JSON file")
    parser.add_argument("--devices-per-node", type=int, default=None, help="for two-level clusters")
    parser.add_argument("--objective", default="slowdown", choices=["fastest", "least-energy", "energy-budget", "slowdown"])
    parser.add_argument("--slowdown", type=float, default=0.05, help="for --objective slowdown (0.05 = 5%%)")
    parser.add_argument("--budget", type=float, default=None, help="J/sample, for --objective energy-budget")
    parser.add_argument("--busy-w", type=float, default=None, help="watts per busy device (default: board power)")
    parser.add_argument("--idle-w", type=float, default=None, help="watts per idle device (default: preset idle power)")
    parser.add_argument("--count-unused", action="store_true", help="charge unused devices their idle power")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--plot", default=None, help="write a PNG of throughput and energy against devices")


def _build_model(args) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import fxpar.models as models

    with torch.device("meta"):
        if args.model == "mlp":
            model = models.MLP(tuple(int(d) for d in args.dims.split(",")))
        elif args.model in ("alexnet", "vgg16"):
            cls = {"alexnet": "AlexNet", "vgg16": "VGG16"}[args.model]
            if not hasattr(models, cls):
                raise SweepError(f"fxpar.models has no {cls} in this version; use --model mlp")
            model = getattr(models, cls)(image_size=args.image_size)
        else:
            raise SweepError(f"unknown --model {args.model!r}; use mlp, alexnet or vgg16")
        return model, tuple(model.example_inputs(args.batch))


def run(args) -> None:
    from pathlib import Path

    from fxpar.cluster import preset

    cluster = Cluster.load(args.cluster) if Path(args.cluster).is_file() else preset(args.cluster)
    objective = Objective(args.objective, max_joules_per_sample=args.budget,
                          max_slowdown=args.slowdown if args.objective == "slowdown" else None)
    power = PowerModel.of(cluster.device, busy_w=args.busy_w, idle_w=args.idle_w, count_unused=args.count_unused)
    model, inputs = _build_model(args)
    result = sweep(model, inputs, cluster=cluster, objective=objective, power=power,
                   devices_per_node=args.devices_per_node, optimizer=args.optimizer)
    print(result.table())
    if args.plot:
        try:
            plot(result, args.plot)
        except SweepError as exc:
            print(f"no plot written: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"plot written to {args.plot}")
