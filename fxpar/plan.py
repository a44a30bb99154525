"""Plans: what the solver chose for every node, what it predicts, and how to read it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from fxpar.cluster import Cluster, describe_value
from fxpar.errors import ClusterSpecError, PlanFileError, PlanMismatchError
from fxpar.placement import Placement, Shard, Spec, placement_from_str, spec_str
from fxpar.rules.registry import OpStrategy

aten = torch.ops.aten

# Plan JSON writes every figure it predicts (seconds, bytes, gaps) rounded to this many significant
# digits, so that float noise in the last digits of a solve does not change the text.
FIGURE_DIGITS = 6
# Solver figures that differ from run to run; they live in ``plan.timings``, not in the JSON.
RUN_DEPENDENT_SOLVER_KEYS = ("build_s", "solve_s")


def round_figure(x):
    """``x`` rounded to ``FIGURE_DIGITS`` significant digits if it is a finite float."""
    if isinstance(x, float) and math.isfinite(x):
        return float(f"{x:.{FIGURE_DIGITS}g}")
    return x


def strategy_to_json(s: OpStrategy) -> dict:
    return {"inputs": [[repr(p) for p in spec] for spec in s.inputs], "outputs": [[repr(p) for p in spec] for spec in s.outputs]}


def fmt_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit below it: ``512 B``, ``3.1 KiB``, ``2.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


_fmt_bytes = fmt_bytes


def _fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def matmul_kind(target, strategy: OpStrategy, axis: int) -> str:
    """What a matmul does on one mesh axis: batch (data parallel), column, row, partial or replicate."""
    off = 1 if target == aten.addmm.default else 0
    a, b = strategy.inputs[off][axis], strategy.inputs[off + 1][axis]
    out = strategy.outputs[0][axis]
    batch_dims = 1 if target == aten.bmm.default else 0
    if isinstance(a, Shard) and isinstance(b, Shard) and a.dim == batch_dims + 1:
        return "row"
    if isinstance(out, Shard):
        if out.dim == batch_dims:
            return "batch"
        if out.dim == batch_dims + 1:
            return "column"
        return "batch"
    if repr(a) == "P" or repr(b) == "P":
        return "partial"
    return "replicate"


@dataclass
class Plan:
    """The solver's choice for every node of one captured graph, and what it predicts.

    ``to_json()`` is deterministic: keys sorted, predicted figures rounded to ``FIGURE_DIGITS``
    significant digits, and the run-dependent solver timings (``plan.timings``) left out, so the same
    model, inputs and cluster give the same text. ``Plan.from_json`` checks a text field by field."""

    mesh_shape: tuple[int, ...]
    cluster: Cluster
    strategies: dict[str, OpStrategy]
    predicted_step_s: float
    compute_s: float
    comm_s: float
    memory_bytes: float
    param_specs: dict[str, Spec]
    optimizer: str
    solver: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    # Forward ops recomputed in the backward pass, by node name in graph order (passes.recompute).
    recompute: list[str] = field(default_factory=list)
    # How the ranks are given the batch: "shard" (each its slice of dim 0) or "replicate" (each the
    # whole batch); fxpar.compile's input_placement.
    input_placement: str = "shard"
    # The batch-norm statistics the plan was priced for: "global" or "local"; fxpar.compile's batch_norm.
    batch_norm: str = "global"

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent building and solving the ILP (``build_s``, ``solve_s``); empty for a plan read
        from JSON, as they are not part of the plan's text."""
        return {k: self.solver[k] for k in RUN_DEPENDENT_SOLVER_KEYS if k in self.solver}

    def assignment(self, gm: GraphModule) -> dict[Node, OpStrategy]:
        from fxpar.solve.strategies import node_strategies

        self._check_param_specs(gm)
        out = {}
        planned = ("placeholder", "get_attr", "call_function")
        names = {n.name for n in gm.graph.nodes if n.op in planned}
        if names != set(self.strategies):
            missing = sorted(names - set(self.strategies))[:5]
            extra = sorted(set(self.strategies) - names)[:5]
            raise PlanMismatchError(
                f"the plan does not match the captured graph: nodes without a strategy {missing}, "
                f"strategies for unknown nodes {extra}; plan again for this model and these input shapes"
            )
        memo: dict = {}
        for n in gm.graph.nodes:
            if n.op not in planned:
                continue
            s = self.strategies[n.name]
            if s not in node_strategies(n, self.mesh_shape, memo=memo):
                raise PlanMismatchError(
                    f"the plan gives %{n.name} ({n.target}) the strategy {s.label()}, which its rule does not "
                    f"allow on mesh {list(self.mesh_shape)}; plan again for this model"
                )
            out[n] = s
        return out

    def _check_param_specs(self, gm: GraphModule) -> None:
        """``param_specs`` (how parameters are placed on each rank) must agree with the strategies of
        the parameters' nodes (what the rewritten graph expects)."""
        for n in gm.graph.nodes:
            if n.op != "placeholder" or n.meta.get("fxpar_role") != "param" or n.name not in self.strategies:
                continue
            fqn = n.meta["fxpar_fqn"]
            node_spec = self.strategies[n.name].outputs[0]
            if fqn not in self.param_specs:
                raise PlanMismatchError(
                    f"the plan has no param_specs entry for parameter {fqn} (node %{n.name}); plan again for this "
                    "model, or add it as the strategy of its node gives it: "
                    f"{json.dumps([repr(p) for p in node_spec])}"
                )
            if tuple(self.param_specs[fqn]) != tuple(node_spec):
                raise PlanMismatchError(
                    f"the plan contradicts itself: param_specs[{fqn!r}] is {spec_str(self.param_specs[fqn])} but the "
                    f"strategy of its node %{n.name} places it {spec_str(node_spec)}; plan again, or make the two agree"
                )

    def explain(self) -> str:
        lines = [
            f"fxpar plan: mesh {list(self.mesh_shape)} on {self.cluster.name} ({self.cluster.device.name}), optimizer {self.optimizer}",
            f"{'layer / node':<34} {'op':<22} {'rule':<7} {'placement / strategy':<28} {'time':>10}  comm",
        ]
        for row in self.rows:
            lines.append(
                f"{row['name'][:34]:<34} {row['op'][:22]:<22} {row.get('source', ''):<7} {row['strategy'][:28]:<28} "
                f"{row['time']:>10}  {row['comm']}"
            )
        derived = sorted({row["op"] for row in self.rows if row.get("source") == "dtensor"})
        if derived:
            lines.append(f"strategies from torch's DTensor (no rule of fxpar's own): {', '.join(derived)}")
        lines += [f"fallback: {note}" for note in self.fallbacks]
        s = self.solver
        if self.recompute:
            shown = ", ".join(f"%{n}" for n in self.recompute[:12]) + (" ..." if len(self.recompute) > 12 else "")
            lines.append(
                f"recomputed in the backward pass: {len(self.recompute)} ops ({shown}), costing "
                f"{_fmt_s(s.get('recompute_compute_s', 0.0))} of compute and {_fmt_s(s.get('recompute_comm_s', 0.0))} "
                f"of communication; memory per device {_fmt_bytes(self.memory_bytes)} instead of "
                f"{_fmt_bytes(s.get('memory_kept_bytes', self.memory_bytes))} keeping every activation"
            )
        lines += [
            f"predicted step: {_fmt_s(self.predicted_step_s)} (compute {_fmt_s(self.compute_s)}, of which "
            f"{_fmt_s(s.get('optimizer_s', 0.0))} the {self.optimizer} update; communication {_fmt_s(self.comm_s)}); "
            f"memory per device {_fmt_bytes(self.memory_bytes)} "
            f"of {_fmt_bytes(self.cluster.device.memory_bytes)}",
            f"gradient sync {_fmt_s(self.solver.get('grad_sync_s', 0.0))}, of which "
            f"{_fmt_s(self.solver.get('hidden_grad_sync_s', 0.0))} hidden behind backward compute",
            f"solver: {s.get('status')}, gap {s.get('gap', 0.0):.2%}, {s.get('num_variables')} variables, "
            f"{s.get('num_constraints')} constraints, build {s.get('build_s', 0):.2f} s, solve {s.get('solve_s', 0):.2f} s",
        ]
        return "\n".join(lines)

    def to_json(self) -> str:
        solver = {k: round_figure(v) for k, v in self.solver.items() if k not in RUN_DEPENDENT_SOLVER_KEYS}
        return json.dumps(
            {
                "mesh_shape": list(self.mesh_shape),
                "cluster": json.loads(self.cluster.to_json()),
                "strategies": {k: strategy_to_json(v) for k, v in self.strategies.items()},
                "predicted_step_s": round_figure(self.predicted_step_s),
                "compute_s": round_figure(self.compute_s),
                "comm_s": round_figure(self.comm_s),
                "memory_bytes": round_figure(float(self.memory_bytes)),
                "param_specs": {k: [repr(p) for p in v] for k, v in self.param_specs.items()},
                "optimizer": self.optimizer,
                "solver": solver,
                "rows": [{k: round_figure(v) for k, v in row.items()} for row in self.rows],
                "fallbacks": self.fallbacks,
                # Written only when something is recomputed, so other plans' text is unchanged.
                **({"recompute": list(self.recompute)} if self.recompute else {}),
                **({"input_placement": self.input_placement} if self.input_placement != "shard" else {}),
                **({"batch_norm": self.batch_norm} if self.batch_norm != "global" else {}),
            },
            indent=1,
            sort_keys=True,
        )

    @staticmethod
    def from_json(text: str) -> Plan:
        """The plan ``text`` (written by ``to_json``) describes; a malformed or self-contradicting
        text raises ``PlanFileError`` naming the key and the value."""
        return _plan_from_json(text)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.to_json() == other.to_json()


def layer_rows(gm: GraphModule, assignment: dict[Node, OpStrategy], problem, choice: dict[Node, int]) -> list[dict]:
    """Rows of the explain() table: each parameter (placement and gradient sync), then each node
    that does FLOP-heavy work, receives resharded inputs, or takes its strategies from another
    source than fxpar's own rules, with the collectives on its inputs and that source (``fxpar``,
    ``dtensor`` or ``none``, ``OpFacts.source``)."""
    from fxpar.reshard import reshard_steps

    mesh_ndim = len(problem.cost_model.mesh_shape)
    incoming: dict[Node, list] = {}
    for e in problem.edges:
        incoming.setdefault(e.consumer, []).append(e)

    def comm_of(n: Node) -> tuple[float, str]:
        total, kinds = 0.0, []
        for e in incoming.get(n, []):
            src, dst = e.out_specs[choice[e.producer]], e.in_specs[choice[n]]
            if src != dst:
                total += problem.edge_cost(e, choice[e.producer], choice[n])
                kinds += [f"{s.kind}@{s.axis}" for s in reshard_steps(src, dst)]
        return total, "+".join(kinds)

    rows = []
    sources = {n: n.meta.get("fxpar_rule_source", "fxpar") for n in gm.graph.nodes if n.op == "call_function"}
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.meta["fxpar_role"] == "param":
            spec = assignment[n].outputs[0]
            t, kinds = comm_of(n)
            rows.append({"name": n.meta["fxpar_fqn"], "op": f"param {list(n.meta['val'].shape)}",
                         "strategy": spec_str(spec), "time": _fmt_s(t), "comm": "grad " + (kinds or "local")})
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t, kinds = comm_of(n)
        if not n.meta.get("fxpar_flops") and not kinds and sources[n] == "fxpar":
            continue
        s = assignment[n]
        kind = ""
        if n.target in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            kind = "/".join(matmul_kind(n.target, s, a) for a in range(mesh_ndim)) + " "
        rows.append({"name": f"%{n.name}", "op": str(n.target).replace("aten.", "").replace(".default", ""),
                     "strategy": kind + s.label(), "time": _fmt_s(problem.node_cost[n][choice[n]]),
                     "comm": f"{kinds} {_fmt_s(t)}" if kinds else "", "source": sources[n]})
    return rows


_PLAN_KEYS = ("cluster", "comm_s", "compute_s", "memory_bytes", "mesh_shape", "optimizer", "param_specs",
              "predicted_step_s", "rows", "solver", "strategies")
_PLAN_OPTIONAL_KEYS = ("batch_norm", "fallbacks", "input_placement", "recompute")
_PLAN_HINT = "make plans with fxpar.plan and Plan.to_json() rather than editing them by hand"


def _plan_error(key: str, value, expected: str) -> PlanFileError:
    return PlanFileError(f"plan JSON: {key} is {describe_value(value)}; it must be {expected}; {_PLAN_HINT}")


def _placement_from_json(text, key: str) -> Placement:
    if isinstance(text, str):
        try:
            p = placement_from_str(text)
        except ValueError:
            p = None
        if p is not None and not (isinstance(p, Shard) and p.dim < 0):
            return p
    raise _plan_error(
        key, text, "a placement: 'R' (replicated), 'P' (partial sum) or 'S(d)' (split along tensor dim d >= 0)"
    )


def _spec_from_json(value, key: str, num_axes: int) -> Spec:
    if not isinstance(value, list) or len(value) != num_axes:
        raise _plan_error(key, value, f"a list of {num_axes} placements, one per mesh axis, e.g. {['R'] * num_axes}")
    return tuple(_placement_from_json(p, f"{key}[{i}]") for i, p in enumerate(value))


def _strategy_from_json(value, key: str, num_axes: int) -> OpStrategy:
    if not isinstance(value, dict) or sorted(value) != ["inputs", "outputs"]:
        raise _plan_error(key, value, 'an object {"inputs": [...], "outputs": [...]} of specs')
    specs = {}
    for part in ("inputs", "outputs"):
        if not isinstance(value[part], list):
            raise _plan_error(f"{key}.{part}", value[part], "a list of specs")
        specs[part] = tuple(_spec_from_json(v, f"{key}.{part}[{i}]", num_axes) for i, v in enumerate(value[part]))
    return OpStrategy(specs["inputs"], specs["outputs"])


def _plan_from_json(text: str) -> Plan:
    from fxpar.solve.problem import OPTIMIZER_STATE_FACTOR

    if not isinstance(text, (str, bytes, bytearray)):
        raise PlanFileError(f"Plan.from_json takes the text of Plan.to_json(), not {describe_value(text)}")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFileError(
            f"plan JSON is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; {_PLAN_HINT}"
        ) from None
    except UnicodeDecodeError as exc:
        raise PlanFileError(f"plan JSON is not UTF-8 text ({exc.reason} at byte {exc.start}); {_PLAN_HINT}") from None
    except RecursionError:
        raise PlanFileError(f"plan JSON nests too deeply to be a plan; {_PLAN_HINT}") from None
    if not isinstance(d, dict):
        raise _plan_error("the top level", d, f"an object with the keys {list(_PLAN_KEYS)}")
    unknown = sorted(set(d) - set(_PLAN_KEYS) - set(_PLAN_OPTIONAL_KEYS))
    missing = [k for k in _PLAN_KEYS if k not in d]
    if unknown or missing:
        raise PlanFileError(f"plan JSON: unknown keys {unknown}, missing keys {missing}; {_PLAN_HINT}")
    mesh = d["mesh_shape"]
    whole = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in mesh) if isinstance(mesh, list) else False
    if not (mesh and whole):
        raise _plan_error("mesh_shape", mesh, "a non-empty list of positive whole numbers, e.g. [2, 4]")
    try:
        cluster = Cluster.from_json(json.dumps(d["cluster"]), origin="plan JSON: cluster")
    except ClusterSpecError as exc:
        raise PlanFileError(str(exc)) from None
    if not isinstance(d["strategies"], dict):
        raise _plan_error("strategies", d["strategies"], "an object from node name to strategy")
    strategies = {k: _strategy_from_json(v, f"strategies[{k!r}]", len(mesh)) for k, v in d["strategies"].items()}
    figures = {}
    for key in ("predicted_step_s", "compute_s", "comm_s", "memory_bytes"):
        v = d[key]
        # NaN is allowed: a plan put together by hand (not solved) has no predictions.
        if not (isinstance(v, (int, float)) and not isinstance(v, bool)) or math.isinf(v):
            raise _plan_error(key, v, "a number (NaN where nothing is predicted)")
        figures[key] = v
    if not isinstance(d["param_specs"], dict):
        raise _plan_error("param_specs", d["param_specs"], "an object from parameter name to spec")
    param_specs = {k: _spec_from_json(v, f"param_specs[{k!r}]", len(mesh)) for k, v in d["param_specs"].items()}
    if d["optimizer"] not in OPTIMIZER_STATE_FACTOR:
        raise _plan_error("optimizer", d["optimizer"], f"one of {sorted(OPTIMIZER_STATE_FACTOR)}")
    if not isinstance(d["solver"], dict):
        raise _plan_error("solver", d["solver"], "an object")
    if not (isinstance(d["rows"], list) and all(isinstance(r, dict) for r in d["rows"])):
        raise _plan_error("rows", d["rows"], "a list of objects (the rows of explain())")
    fallbacks = d.get("fallbacks", [])
    if not (isinstance(fallbacks, list) and all(isinstance(f, str) for f in fallbacks)):
        raise _plan_error("fallbacks", fallbacks, "a list of strings")
    recompute = d.get("recompute", [])
    if not (isinstance(recompute, list) and all(isinstance(n, str) for n in recompute)):
        raise _plan_error("recompute", recompute, "a list of node names")
    unknown_nodes = [n for n in recompute if n not in strategies][:5]
    if unknown_nodes:
        raise _plan_error("recompute", unknown_nodes, "names of nodes the plan has strategies for")
    from fxpar.solve.strategies import INPUT_PLACEMENTS

    input_placement = d.get("input_placement", "shard")
    if input_placement not in INPUT_PLACEMENTS:
        raise _plan_error("input_placement", input_placement, " or ".join(map(repr, INPUT_PLACEMENTS)))
    from fxpar.runtime.steps import BATCH_NORM_STATS

    batch_norm = d.get("batch_norm", "global")
    if batch_norm not in BATCH_NORM_STATS:
        raise _plan_error("batch_norm", batch_norm, " or ".join(map(repr, BATCH_NORM_STATS)))
    return Plan(
        mesh_shape=tuple(mesh), cluster=cluster, strategies=strategies, param_specs=param_specs,
        optimizer=d["optimizer"], solver=d["solver"], rows=d["rows"], fallbacks=fallbacks, recompute=recompute,
        input_placement=input_placement, batch_norm=batch_norm, **figures,
    )
