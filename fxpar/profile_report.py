"""Where the error is: per-op predicted against measured time of one plan on real ranks.

``measure(factory, nprocs=2)`` plans the model that ``factory()`` returns (or takes a ``plan=``),
runs its per-rank step with the **eager** runtime (``fxpar.compile(..., codegen="eager")``: the
rewritten graph op by op, so that every profiler event is one graph op) on ``nprocs`` gloo ranks
(``fxpar.launch``) under ``torch.profiler``, and compares each op with the cost model's price of it.

With ``codegen="inductor"`` it runs the step the default runtime runs, compiled by Inductor with
its kernel profiling on (CPU: ``cpp.enable_kernel_profile``, so each generated kernel is a profiler
event). Library calls (matmuls, convolutions, attention) stay graph ops and keep their rows;
Inductor's generated kernels fuse the graph's elementwise ops and reductions, so those are
compared as one class, ``fused``: the nodes of the elementwise and reduction classes (predicted)
against the generated kernels (measured, a row per kernel by signature).

Measured: the CPU time of the profiler's top-level ``aten::`` events (those with no ``aten::``
event above them; what an op calls inside itself belongs to it) in the timed steps (the compiled
call and ``loss.backward()``; not the optimizer), per step, averaged over ranks. The profiler's
own cost per event (record_shapes is on) is in the measured figures.

Predicted: ``CostModel.compute_time`` of each graph node under the plan's strategy, with the
cluster the plan was made for, the same figure the plan's compute time sums.

Rows are keyed by op signature: the aten op and the per-device shapes of its tensor inputs (as the
profiler records them; 0-d tensors and non-tensor arguments left out), or with ``by="op"`` by the
op alone, or with ``by="class"`` by the cost model's op class. A signature the graph has and the
profiler does not (or the other way round: ops the runtime adds, such as autograd's gradient
accumulation or the collectives' copies) has a zero on one side. Collectives are one row,
``communication``: the plan's predicted time of all its collectives (``Plan.comm_s`` plus the
gradient sync it predicts hidden under backward compute) against the measured CPU time of the
top-level ``c10d::``, ``_c10d_functional::`` and ``gloo:`` events on the thread that runs the step
(the time a rank spends issuing and waiting for them, including waiting for slower ranks; gloo's
own threads, which do the transfers meanwhile, are left out).

    from fxpar.profile_report import measure
    report = measure(my_module.make_model_and_inputs, nprocs=2)   # an importable factory
    print(report.table())
"""

from __future__ import annotations

import importlib
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fxpar.cluster import Cluster
from fxpar.cost import CostModel, op_class
from fxpar.placement import local_shape
from fxpar.plan import Plan
from fxpar.rules.registry import input_source, op_facts, output_values, tensor_arg_nodes

Factory = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
COMMUNICATION = "communication"
FUSED = "fused"  # Inductor's generated kernels, and the elementwise and reduction nodes they fuse
RUNTIME = "runtime (outside the ops)"
BY = ("signature", "op", "class")
CODEGENS = ("eager", "inductor")
COMM_PREFIXES = ("c10d::", "gloo:", "_c10d_functional::")


@dataclass
class Row:
    key: str  # the op signature, op or class
    op_class: str
    nodes: int  # graph nodes priced under this key
    calls: float  # measured calls per step (mean over ranks)
    predicted_s: float  # per step
    measured_s: float  # per step, mean over ranks

    @property
    def error_s(self) -> float:
        return self.predicted_s - self.measured_s


@dataclass
class NodeReport:
    """Predicted against measured seconds per step, per op signature, op or class, for one plan."""

    rows: list[Row]  # sorted by absolute error, largest first
    plan: Plan
    cluster: str
    nprocs: int
    steps: int
    by: str
    measured_step_s: float  # wall time of a timed step, median over steps of the slowest rank (under the profiler)
    notes: list[str] = field(default_factory=list)
    # signature -> (class, nodes, seconds); signature -> [seconds, calls] per step; measured communication
    raw: dict = field(default_factory=dict, repr=False)
    codegen: str = "eager"  # the runtime measured

    def regroup(self, by: str) -> NodeReport:
        """The same measurements keyed by ``by`` ("signature", "op" or "class")."""
        if by not in BY:
            raise ValueError(f"by={by!r}; give one of {list(BY)}")

        def key_of(sig: tuple[str, tuple], klass: str) -> str:
            if by == "class":
                return klass
            if by == "op":
                return sig[0]
            return sig[0] + "(" + ", ".join("x".join(map(str, s)) for s in sig[1]) + ")"

        rows: dict[str, Row] = {}
        fused = self.codegen == "inductor"
        for sig, (klass, n, t) in self.raw["predicted"].items():
            if fused and klass in ("elementwise", "reduction"):
                klass = FUSED
            k = key_of(sig, klass)
            row = rows.setdefault(k, Row(k, klass, 0, 0.0, 0.0, 0.0))
            row.nodes += n
            row.predicted_s += t
        for sig, (seconds, calls) in self.raw["measured"].items():
            klass = FUSED if _is_kernel(sig[0]) else _class_of(sig[0])
            k = key_of(sig, klass)
            row = rows.setdefault(k, Row(k, klass, 0, 0.0, 0.0, 0.0))
            row.calls += calls
            row.measured_s += seconds
        hidden = float(self.plan.solver.get("hidden_grad_sync_s", 0.0) or 0.0)
        in_ops = self.raw.get("comm_in_ops_s", 0.0)
        rows[COMMUNICATION] = Row(COMMUNICATION, COMMUNICATION, 0, 0.0, self.plan.comm_s + hidden + in_ops,
                                  self.raw["comm_s"])
        ordered = sorted(rows.values(), key=lambda r: -abs(r.error_s))
        unpriced = [r for r in ordered if r.nodes == 0 and r.key != COMMUNICATION]
        notes = []
        if hidden:
            notes.append(f"communication: predicted {hidden * 1e3:.3f} ms of the collectives' time hidden under backward "
                         "compute (gradient sync) and the rest blocking; measured is the CPU time of the c10d/gloo "
                         "events (issuing, and waiting for the collective and for the other ranks).")
        if in_ops:
            notes.append(f"communication: {in_ops * 1e3:.3f} ms of it is predicted inside ops (batch norm's statistics "
                         "over a cut batch), which the plan counts as their compute.")
        if unpriced:
            notes.append(f"{len(unpriced)} measured row(s) have no graph node (ops the runtime or autograd adds, or "
                         f"shapes that differ from the graph's): {sum(r.measured_s for r in unpriced) * 1e3:.3f} ms a step.")
        if self.raw.get("step_s"):
            # What the measured step spends in none of the rows above, against the runtime's work
            # around the graph that the plan prices (the gradients' hand-over).
            outside = self.raw["step_s"] - sum(r.measured_s for r in ordered)
            handoff = float(self.plan.solver.get("gradient_handoff_s", 0.0) or 0.0)
            ordered = sorted([*ordered, Row(RUNTIME, RUNTIME, 0, 0.0, handoff, outside)], key=lambda r: -abs(r.error_s))
            notes.append(f"{RUNTIME}: the measured step (mean over ranks) outside every other row: the Python around "
                         "the ops (the compiled graph's wrapper, the module's call), autograd's hand-over of the "
                         "gradients, the profiler's own events; predicted, the plan's gradient hand-over.")
        return NodeReport(ordered, self.plan, self.cluster, self.nprocs, self.steps, by, self.measured_step_s,
                          notes, self.raw, self.codegen)

    def table(self, limit: int | None = None) -> str:
        ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
        lines = [f"Plan on mesh {list(self.plan.mesh_shape)} priced for {self.cluster!r}; {self.codegen} runtime on "
                 f"{self.nprocs} gloo rank(s), {self.steps} profiled step(s); per step, mean over ranks.", "",
                 f"| {self.by} | class | graph nodes | calls measured | predicted ms | measured ms | error ms | error |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows[:limit]:
            rel = f"{r.predicted_s / r.measured_s - 1:+.0%}" if r.measured_s > 0 else "n/a"
            lines.append(f"| `{r.key}` | {r.op_class} | {r.nodes} | {r.calls:g} | {ms(r.predicted_s)} | "
                         f"{ms(r.measured_s)} | {r.error_s * 1e3:+.3f} | {rel} |")
        if limit is not None and len(self.rows) > limit:
            rest = self.rows[limit:]
            lines.append(f"| ({len(rest)} more) | | {sum(r.nodes for r in rest)} | | {ms(sum(r.predicted_s for r in rest))} | "
                         f"{ms(sum(r.measured_s for r in rest))} | | |")
        pred = sum(r.predicted_s for r in self.rows)
        meas = sum(r.measured_s for r in self.rows)
        lines += ["", f"Sum of rows: predicted {ms(pred)} ms, measured {ms(meas)} ms. Plan's predicted step "
                  f"{ms(self.plan.predicted_step_s)} ms; measured step (wall, under the profiler) {ms(self.measured_step_s)} ms."]
        lines += self.notes
        return "\n".join(lines)


def _shapes_key(shapes) -> tuple:
    """The non-empty tensor shapes of an op's inputs, as the profiler records them."""
    out = []
    for s in shapes:
        if isinstance(s, (list, tuple)) and s and all(isinstance(d, int) for d in s):
            out.append(tuple(s))
    return tuple(out)


def _aten_name(target) -> str | None:
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else None


def node_signature(node, strategy, mesh_shape) -> tuple[str, tuple]:
    """(``aten::op``, per-device shapes of its tensor inputs) of a graph node under ``strategy``."""
    shapes = []
    for j, _ in enumerate(tensor_arg_nodes(node)):
        u, i = input_source(node, j)
        t = output_values(u)[i]
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            shapes.append(local_shape(tuple(t.shape), strategy.inputs[j], mesh_shape))
    return _aten_name(node.target), tuple(shapes)


def predicted_collectives_in_ops(gm, plan: Plan, cluster: Cluster) -> float:
    """Seconds of the collectives that ops run inside themselves under the plan (batch norm's
    statistics, ``CostModel.batch_norm_stats_time``), which ``compute_time`` includes."""
    cm = CostModel(cluster, plan.mesh_shape)
    return sum(cm.batch_norm_stats_time(n, plan.strategies[n.name]) for n in gm.graph.nodes
               if n.op == "call_function" and n.name in plan.strategies)


def predicted_by_signature(gm, plan: Plan, cluster: Cluster) -> dict[tuple[str, tuple], tuple[str, int, float]]:
    """signature -> (op class, graph nodes, predicted seconds) for every aten node of the plan,
    the collectives it runs inside itself left out (``predicted_collectives_in_ops``)."""
    cm = CostModel(cluster, plan.mesh_shape)
    out: dict = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.name not in plan.strategies or _aten_name(node.target) is None:
            continue
        strategy = plan.strategies[node.name]
        # 0 for views: they keep a row, to show what they measure. Batch norm's statistics
        # collectives, which the cost model prices with the node, go to the communication row.
        t = cm.compute_time(node, strategy) - cm.batch_norm_stats_time(node, strategy)
        key = node_signature(node, strategy, plan.mesh_shape)
        klass, n, total = out.get(key, (op_class(node), 0, 0.0))
        out[key] = (klass, n + 1, total + t)
    return out


def _is_kernel(name: str) -> bool:
    """Whether a profiler event is a kernel Inductor generated (``graph_0_cpp_fused_relu_3``)."""
    return "cpp_fused_" in name or "triton_" in name


def _top_level(events) -> tuple[dict, float]:
    """({(aten name or generated kernel, shapes): [microseconds, calls]}, communication microseconds)
    of the events with no aten::, collective or generated-kernel event above them, on the thread
    that ran the profiled steps (the ``fxpar_step`` ranges)."""
    ops: dict = {}
    comm = 0.0
    # The thread that runs the step: a collective's work on gloo's own threads overlaps it in time.
    steps = {e.thread for e in events if e.name == "fxpar_step"}
    for e in events:
        name = e.name
        if steps and e.thread not in steps:
            continue
        is_comm = name.startswith(COMM_PREFIXES)
        if not (name.startswith("aten::") or is_comm or _is_kernel(name)):
            continue
        parent, nested, inside = e.cpu_parent, False, not steps
        while parent is not None:
            if parent.name.startswith(("aten::", *COMM_PREFIXES)) or _is_kernel(parent.name):
                nested = True
            inside = inside or parent.name == "fxpar_step"
            parent = parent.cpu_parent
        if nested or not inside:
            continue
        if is_comm:
            comm += e.cpu_time_total
            continue
        if _is_kernel(name):
            # graph_0_cpp_fused_relu_3: the graph's index is the compile's, not the kernel's.
            key = (name.split("_", 2)[2] if name.startswith("graph_") else name, ())
            slot = ops.setdefault(key, [0.0, 0])
            slot[0] += e.cpu_time_total
            slot[1] += 1
            continue
        key = (name, _shapes_key(e.input_shapes or ()))
        slot = ops.setdefault(key, [0.0, 0])
        slot[0] += e.cpu_time_total
        slot[1] += 1
    return ops, comm


def _load_factory(spec) -> Factory:
    """A factory, ``"module:function"``, or ``("module:function", args)`` (called with ``args``)."""
    if callable(spec):
        return spec
    args: tuple = ()
    if isinstance(spec, tuple):
        spec, args = spec
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return (lambda: fn(*args)) if args else fn


def _rank(rank: int, factory_spec, plan_json: str, steps: int, warmup: int, codegen: str = "eager") -> dict:
    import torch.distributed as dist
    from torch._inductor import config
    from torch.profiler import ProfilerActivity, profile, record_function

    import fxpar

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, inputs = _load_factory(factory_spec)()
    plan = Plan.from_json(plan_json)
    compiled = fxpar.compile(model, inputs, plan=plan, codegen=codegen, input_placement=plan.input_placement,
                             batch_norm=plan.batch_norm)
    world = dist.get_world_size()
    local = list(inputs) if plan.input_placement == "replicate" else [t.chunk(world)[rank] for t in inputs]

    params = list(compiled.parameters())

    def step():
        loss = compiled(*local)
        loss.backward()

    def zero_grad():  # as a training loop's optimizer.zero_grad() does, outside the timed step
        for p in params:
            p.grad = None

    # The first call compiles (Inductor), with every generated CPU kernel recording a profiler event.
    with config.patch({"cpp.enable_kernel_profile": True}):
        for _ in range(max(1, warmup)):
            step()
            zero_grad()
    walls = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            with record_function("fxpar_step"):
                step()
            walls.append(time.perf_counter() - start)
            zero_grad()
    ops, comm = _top_level(prof.events())
    return {"ops": ops, "comm_us": comm, "walls": walls, "codegen": compiled.codegen}


def measure(
    factory,
    *,
    nprocs: int = 2,
    cluster: Cluster | None = None,
    plan: Plan | None = None,
    steps: int = 3,
    warmup: int = 1,
    by: str = "signature",
    optimizer: str = "adam",
    codegen: str = "eager",
) -> NodeReport:
    """Run the plan of ``factory()``'s model (``plan``, or fxpar's own for ``cluster`` on mesh
    ``(nprocs,)``; default cluster: the ``cpu-local`` preset) on ``nprocs`` gloo ranks and report
    predicted against measured time per op signature (``by="signature"``), op (``"op"``) or op
    class (``"class"``). ``factory`` (a top-level function, ``"module:function"``, or
    ``("module:function", args)``) returns the model and its example global batch, the same on
    every call (every rank calls it). ``codegen``: the runtime measured, ``"eager"`` (op by op)
    or ``"inductor"`` (the compiled step; see the module's docstring)."""
    import fxpar
    from fxpar.planner import capture_and_annotate, plan_graph

    if by not in BY:
        raise ValueError(f"by={by!r}; give one of {list(BY)}")
    if codegen not in CODEGENS:
        raise ValueError(f"codegen={codegen!r}; give one of {list(CODEGENS)}")
    model, inputs = _load_factory(factory)()
    gm = capture_and_annotate(model, inputs, input_placement=plan.input_placement if plan is not None else "shard",
                              batch_norm=plan.batch_norm if plan is not None else "global")
    if cluster is None:
        cluster = fxpar.preset("cpu-local")
    if plan is None:
        plan, _ = plan_graph(gm, cluster=cluster, mesh_shape=(nprocs,), optimizer=optimizer)
    predicted = predicted_by_signature(gm, plan, cluster)
    results = fxpar.launch(_rank, nprocs, factory, plan.to_json(), steps, warmup, codegen)
    measured: dict = {}
    for r in results:
        for key, (us, calls) in r["ops"].items():
            slot = measured.setdefault(key, [0.0, 0.0])
            slot[0] += us * 1e-6 / steps / len(results)
            slot[1] += calls / steps / len(results)
    if codegen == "inductor":
        # Inductor calls a library op with its output buffer (``extern_kernels.addmm(..., out=buf)``),
        # one shape more than the graph's node: the same row.
        for key in [k for k in measured if k not in predicted and (k[0], k[1][:-1]) in predicted]:
            slot = measured.setdefault((key[0], key[1][:-1]), [0.0, 0.0])
            seconds, calls = measured.pop(key)
            slot[0] += seconds
            slot[1] += calls
    comm = sum(r["comm_us"] for r in results) * 1e-6 / steps / len(results)
    walls = [max(r["walls"][i] for r in results) for i in range(steps)]
    step_s = sum(sum(r["walls"]) for r in results) / steps / len(results)
    raw = {"predicted": predicted, "measured": measured, "comm_s": comm, "step_s": step_s,
           "comm_in_ops_s": predicted_collectives_in_ops(gm, plan, cluster)}
    ran = results[0]["codegen"]  # "eager" where Inductor fell back (no C++ compiler)
    return NodeReport([], plan, cluster.name, nprocs, steps, by, statistics.median(walls), raw=raw,
                      codegen=ran).regroup(by)


def _class_of(name: str) -> str:
    """The cost model's op class of a profiler event's op (``aten::addmm`` -> matmul)."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return "elementwise"
    overloads = packet.overloads()
    target = getattr(packet, "default" if "default" in overloads else overloads[0]) if overloads else None
    return op_facts(target).cost_class if target is not None else "elementwise"
