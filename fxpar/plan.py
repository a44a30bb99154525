"""Plans: what the solver chose for every node, what it predicts, and how to read it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from fxpar.cluster import Cluster
from fxpar.errors import PlanMismatchError
from fxpar.placement import Shard, Spec, placement_from_str, spec_str
from fxpar.rules.registry import OpStrategy

aten = torch.ops.aten


def strategy_to_json(s: OpStrategy) -> dict:
    return {"inputs": [[repr(p) for p in spec] for spec in s.inputs], "outputs": [[repr(p) for p in spec] for spec in s.outputs]}


def strategy_from_json(d: dict) -> OpStrategy:
    conv = lambda specs: tuple(tuple(placement_from_str(p) for p in spec) for spec in specs)  # noqa: E731
    return OpStrategy(conv(d["inputs"]), conv(d["outputs"]))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


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

    def assignment(self, gm: GraphModule) -> dict[Node, OpStrategy]:
        from fxpar.solve.strategies import node_strategies

        out = {}
        names = {n.name for n in gm.graph.nodes if n.op in ("placeholder", "call_function")}
        if names != set(self.strategies):
            missing = sorted(names - set(self.strategies))[:5]
            extra = sorted(set(self.strategies) - names)[:5]
            raise PlanMismatchError(
                f"the plan does not match the captured graph: nodes without a strategy {missing}, "
                f"strategies for unknown nodes {extra}; plan again for this model and these input shapes"
            )
        for n in gm.graph.nodes:
            if n.op not in ("placeholder", "call_function"):
                continue
            s = self.strategies[n.name]
            if s not in node_strategies(n, self.mesh_shape):
                raise PlanMismatchError(
                    f"the plan gives %{n.name} ({n.target}) the strategy {s.label()}, which its rule does not "
                    f"allow on mesh {list(self.mesh_shape)}; plan again for this model"
                )
            out[n] = s
        return out

    def explain(self) -> str:
        lines = [
            f"fxpar plan: mesh {list(self.mesh_shape)} on {self.cluster.name} ({self.cluster.device.name}), optimizer {self.optimizer}",
            f"{'layer / node':<34} {'op':<22} {'placement / strategy':<28} {'time':>10}  comm",
        ]
        for row in self.rows:
            lines.append(
                f"{row['name'][:34]:<34} {row['op'][:22]:<22} {row['strategy'][:28]:<28} {row['time']:>10}  {row['comm']}"
            )
        lines += [f"fallback: {note}" for note in self.fallbacks]
        s = self.solver
        lines += [
            f"predicted step: {_fmt_s(self.predicted_step_s)} (compute {_fmt_s(self.compute_s)}, "
            f"communication {_fmt_s(self.comm_s)}); memory per device {_fmt_bytes(self.memory_bytes)} "
            f"of {_fmt_bytes(self.cluster.device.memory_bytes)}",
            f"gradient sync {_fmt_s(self.solver.get('grad_sync_s', 0.0))}, of which "
            f"{_fmt_s(self.solver.get('hidden_grad_sync_s', 0.0))} hidden behind backward compute",
            f"solver: {s.get('status')}, gap {s.get('gap', 0.0):.2%}, {s.get('num_variables')} variables, "
            f"{s.get('num_constraints')} constraints, build {s.get('build_s', 0):.2f} s, solve {s.get('solve_s', 0):.2f} s",
        ]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "mesh_shape": list(self.mesh_shape),
                "cluster": json.loads(self.cluster.to_json()),
                "strategies": {k: strategy_to_json(v) for k, v in self.strategies.items()},
                "predicted_step_s": self.predicted_step_s,
                "compute_s": self.compute_s,
                "comm_s": self.comm_s,
                "memory_bytes": self.memory_bytes,
                "param_specs": {k: [repr(p) for p in v] for k, v in self.param_specs.items()},
                "optimizer": self.optimizer,
                "solver": self.solver,
                "rows": self.rows,
                "fallbacks": self.fallbacks,
            },
            indent=1,
        )

    @staticmethod
    def from_json(text: str) -> Plan:
        d = json.loads(text)
        return Plan(
            mesh_shape=tuple(d["mesh_shape"]),
            cluster=Cluster.from_json(json.dumps(d["cluster"])),
            strategies={k: strategy_from_json(v) for k, v in d["strategies"].items()},
            predicted_step_s=d["predicted_step_s"],
            compute_s=d["compute_s"],
            comm_s=d["comm_s"],
            memory_bytes=d["memory_bytes"],
            param_specs={k: tuple(placement_from_str(p) for p in v) for k, v in d["param_specs"].items()},
            optimizer=d["optimizer"],
            solver=d["solver"],
            rows=d["rows"],
            fallbacks=d.get("fallbacks", []),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.to_json() == other.to_json()


def layer_rows(gm: GraphModule, assignment: dict[Node, OpStrategy], problem, choice: dict[Node, int]) -> list[dict]:
    """Rows of the explain() table: each parameter (placement and gradient sync), then each node
    that does FLOP-heavy work or receives resharded inputs, with the collectives on its inputs."""
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
        if not n.meta.get("fxpar_flops") and not kinds:
            continue
        s = assignment[n]
        kind = ""
        if n.target in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            kind = "/".join(matmul_kind(n.target, s, a) for a in range(mesh_ndim)) + " "
        rows.append({"name": f"%{n.name}", "op": str(n.target).replace("aten.", "").replace(".default", ""),
                     "strategy": kind + s.label(), "time": _fmt_s(problem.node_cost[n][choice[n]]),
                     "comm": f"{kinds} {_fmt_s(t)}" if kinds else ""})
    return rows
