"""The sharding ILP: one strategy per node, minimizing predicted step time under a memory bound.

Variables
  x[v,s] in {0,1}   node v uses strategy s (s in S_v, the strategies its rule allows)
  e[k,a,b] in [0,1] on edge k = (u -> v, argument j): u's output has spec a and v wants spec b;
                    specs are grouped, so a ranges over u's distinct output specs, b over v's
                    distinct input specs for argument j (a tight linearization of x_u x_v^T)

Objective (seconds)
  min  sum_v sum_s c_v(s) x[v,s]  +  sum_k sum_{a,b} r_k(a,b) e[k,a,b]
  c_v(s): compute time of v under s, plus for the loss the all-reduce to a replicated scalar;
  r_k(a,b): time of the reshard a -> b of the edge's tensor (fxpar.reshard, fxpar.cost). The
  gradient of parameter p is an edge from its producer to p, wanting p's own spec: all-reduce (DDP)
  or reduce-scatter (ZeRO/FSDP) falls out of it.

Constraints
  add_one_strategy:  sum_s x[v,s] = 1                                         for every node v
  add_edge_links:    sum_b e[k,a,b] = sum_{s: out_k(s)=a} x[u,s],
                     sum_a e[k,a,b] = sum_{s: in_k(s)=b} x[v,s]               for every edge k
  add_memory:        sum_{p params} sum_s w_p(s) x[p,s] + sum_{k from a param} sum_{a!=b} g_k(b) e[k,a,b]
                     + sum_{v in L} sum_s m_v(s) x[v,s] <= M
                     for every maximal set L of simultaneously live activations; w_p counts the
                     parameter, its gradient and optimizer state on one device, g_k(b) a resharded
                     copy of a parameter (kept for the step), m_v the bytes of v's outputs on one
                     device, M the device memory
  add_forced:        x[v,s] = 0 for strategies a caller excluded
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ortools.linear_solver import pywraplp
from torch.fx import GraphModule, Node

from fxpar.cost import CostModel, spec_bytes
from fxpar.passes.capture import step_outputs
from fxpar.placement import replicated
from fxpar.rules.registry import OpStrategy, input_source, output_values, tensor_arg_nodes

OPTIMIZER_STATE_FACTOR = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}


@dataclass
class Edge:
    producer: Node
    consumer: Node
    out_index: int
    tensor: object
    out_specs: list  # per producer strategy: the spec of its output out_index
    in_specs: list  # per consumer strategy: the spec it wants


@dataclass
class Problem:
    nodes: list[Node]
    strategies: dict[Node, list[OpStrategy]]
    node_cost: dict[Node, list[float]]
    edges: list[Edge]
    param_mem: dict[Node, list[float]]
    live_sets: list[list[Node]]
    act_mem: dict[Node, list[float]]
    memory_budget: float
    cost_model: CostModel
    build_seconds: float = 0.0
    forced: dict[Node, set[int]] = field(default_factory=dict)

    def edge_cost(self, edge: Edge, su: int, sv: int) -> float:
        return self.cost_model.reshard_time(edge.tensor, edge.out_specs[su], edge.in_specs[sv])

    def cost_of(self, choice: dict[Node, int]) -> float:
        """The objective of any assignment, computed directly (the reference for brute force)."""
        total = sum(self.node_cost[n][choice[n]] for n in self.nodes)
        return total + sum(self.edge_cost(e, choice[e.producer], choice[e.consumer]) for e in self.edges)

    def memory_of(self, choice: dict[Node, int]) -> float:
        params = sum(self.param_mem[p][choice[p]] for p in self.param_mem)
        mesh = self.cost_model.mesh_shape
        params += sum(
            spec_bytes(e.tensor, e.in_specs[choice[e.consumer]], mesh)
            for e in self.edges
            if e.producer in self.param_mem and e.out_specs[choice[e.producer]] != e.in_specs[choice[e.consumer]]
        )
        peak = max((sum(self.act_mem[v][choice[v]] for v in live) for live in self.live_sets), default=0.0)
        return params + peak


def _liveness(gm: GraphModule) -> list[list[Node]]:
    """Maximal sets of activations live at once, in graph order; views share their base's storage."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    base: dict[Node, Node] = {}
    end: dict[Node, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.meta.get("fxpar_is_view"):
            base[n] = base.get(n.args[0], n.args[0])
        elif n.op in ("placeholder", "call_function") and n.meta.get("fxpar_role") != "param":
            end[n] = order[n]
    for n in gm.graph.nodes:
        for arg in n.all_input_nodes:
            root = base.get(arg, arg)
            if root in end and n.op != "output":
                end[root] = max(end[root], order[n])
    dying: dict[int, list[Node]] = {}
    for n, t in end.items():
        dying.setdefault(t, []).append(n)
    live: list[Node] = []
    sets: list[list[Node]] = []
    for n in gm.graph.nodes:
        if n in end:
            live.append(n)
        dead = dying.get(order[n], [])
        if dead:
            sets.append(list(live))
            live = [v for v in live if v not in set(dead)]
    return sets


def build_problem(
    gm: GraphModule,
    strategies: dict[Node, list[OpStrategy]],
    cost_model: CostModel,
    *,
    optimizer: str = "adam",
) -> Problem:
    start = time.perf_counter()
    mesh_shape = cost_model.mesh_shape
    nodes = list(strategies)
    node_cost = {n: [cost_model.compute_time(n, s) for s in strategies[n]] for n in nodes}
    edges: list[Edge] = []
    for v in nodes:
        for j, _ in enumerate(tensor_arg_nodes(v)):
            u, idx = input_source(v, j)
            edges.append(
                Edge(u, v, idx, output_values(u)[idx], [s.outputs[idx] for s in strategies[u]], [s.inputs[j] for s in strategies[v]])
            )
    loss, grads, buffer_updates = step_outputs(gm)
    rep = replicated(len(mesh_shape))
    # The loss and updated buffers leave the step replicated.
    for out in [loss] + [value for value, _ in buffer_updates]:
        val = out.meta["val"]
        node_cost[out] = [c + cost_model.reshard_time(val, s.outputs[0], rep) for c, s in zip(node_cost[out], strategies[out])]
    params = [param for _, param in grads]
    for grad, param in grads:
        edges.append(
            Edge(grad, param, 0, grad.meta["val"], [s.outputs[0] for s in strategies[grad]], [s.outputs[0] for s in strategies[param]])
        )
    factor = 2 + OPTIMIZER_STATE_FACTOR[optimizer]
    param_mem = {p: [factor * spec_bytes(p.meta["val"], s.outputs[0], mesh_shape) for s in strategies[p]] for p in params}
    live_sets = _liveness(gm)
    act_mem = {}
    for n in {v for live in live_sets for v in live}:
        vals = output_values(n)
        act_mem[n] = [float(sum(spec_bytes(t, sp, mesh_shape) for t, sp in zip(vals, s.outputs) if hasattr(t, "shape"))) for s in strategies[n]]
    return Problem(
        nodes, strategies, node_cost, edges, param_mem, live_sets, act_mem,
        cost_model.cluster.device.memory_bytes, cost_model, time.perf_counter() - start,
    )


@dataclass
class Solution:
    choice: dict[Node, int]
    objective: float
    bound: float
    status: str
    num_variables: int
    num_constraints: int
    solve_seconds: float

    @property
    def gap(self) -> float:
        return 0.0 if self.objective <= 0 else max(0.0, (self.objective - self.bound) / self.objective)


class Infeasible(Exception):
    pass


class SolverTimeout(Exception):
    pass


class _Model:
    def __init__(self, problem: Problem):
        self.p = problem
        self.solver = pywraplp.Solver.CreateSolver("SCIP")
        assert self.solver is not None, "OR-Tools was built without SCIP"
        self.x: dict[Node, list] = {}
        self.objective_terms: list = []
        # Memory of parameters resharded for use (e.g. all-gathered ZeRO shards): the rewrite keeps
        # one copy per wanted spec for the whole step, so it counts in every live set.
        self.param_copy_terms: list = []

    def add_one_strategy(self) -> None:
        s = self.solver
        for i, v in enumerate(self.p.nodes):
            xs = [s.BoolVar(f"x{i}_{k}") for k in range(len(self.p.strategies[v]))]
            self.x[v] = xs
            s.Add(sum(xs) == 1)
            self.objective_terms += [c * x for c, x in zip(self.p.node_cost[v], xs) if c]

    def add_edge_links(self) -> None:
        s = self.solver
        mesh = self.p.cost_model.mesh_shape
        for k, e in enumerate(self.p.edges):
            a_specs = sorted(set(e.out_specs), key=repr)
            b_specs = sorted(set(e.in_specs), key=repr)
            costs = {
                (a, b): self.p.cost_model.reshard_time(e.tensor, a, b) for a in a_specs for b in b_specs
            }
            from_param = e.producer in self.p.param_mem
            copy_bytes = lambda a, b: spec_bytes(e.tensor, b, mesh) if a != b else 0  # noqa: E731
            if len(a_specs) == 1 or len(b_specs) == 1 or not any(costs.values()):
                # One side fixed: the edge cost is a function of the other node alone.
                if from_param and len(a_specs) == 1:
                    self.param_copy_terms += [copy_bytes(a_specs[0], b) * x for x, b in zip(self.x[e.consumer], e.in_specs) if copy_bytes(a_specs[0], b)]
                elif from_param and len(b_specs) == 1:
                    self.param_copy_terms += [copy_bytes(a, b_specs[0]) * x for x, a in zip(self.x[e.producer], e.out_specs) if copy_bytes(a, b_specs[0])]
                if any(costs.values()):
                    if len(a_specs) == 1:
                        for xv, b in zip(self.x[e.consumer], e.in_specs):
                            self.objective_terms.append(costs[(a_specs[0], b)] * xv)
                    else:
                        for xu, a in zip(self.x[e.producer], e.out_specs):
                            self.objective_terms.append(costs[(a, b_specs[0])] * xu)
                continue
            ev = {(a, b): s.NumVar(0, 1, f"e{k}_{ia}_{ib}") for ia, a in enumerate(a_specs) for ib, b in enumerate(b_specs)}
            for a in a_specs:
                s.Add(sum(ev[(a, b)] for b in b_specs) == sum(x for x, sp in zip(self.x[e.producer], e.out_specs) if sp == a))
            for b in b_specs:
                s.Add(sum(ev[(a, b)] for a in a_specs) == sum(x for x, sp in zip(self.x[e.consumer], e.in_specs) if sp == b))
            self.objective_terms += [costs[key] * var for key, var in ev.items() if costs[key]]
            if from_param:
                self.param_copy_terms += [copy_bytes(*key) * var for key, var in ev.items() if copy_bytes(*key)]

    def memory_expr(self, live: list[Node]):
        terms = [m * x for p, ms in self.p.param_mem.items() for m, x in zip(ms, self.x[p]) if m]
        terms += self.param_copy_terms
        terms += [m * x for v in live for m, x in zip(self.p.act_mem[v], self.x[v]) if m]
        return sum(terms)

    def add_memory(self, bound) -> None:
        """Needs add_edge_links first (it collects the parameter copies)."""
        for live in self.p.live_sets or [[]]:
            self.solver.Add(self.memory_expr(live) <= bound)

    def add_forced(self) -> None:
        for v, allowed in self.p.forced.items():
            for k, x in enumerate(self.x[v]):
                if k not in allowed:
                    self.solver.Add(x == 0)


def solve(problem: Problem, *, time_limit_s: float = 60.0) -> Solution:
    start = time.perf_counter()
    m = _Model(problem)
    m.add_one_strategy()
    m.add_edge_links()
    m.add_memory(problem.memory_budget)
    m.add_forced()
    solver = m.solver
    solver.Minimize(sum(m.objective_terms))
    solver.SetTimeLimit(int(time_limit_s * 1000))
    solver.SetNumThreads(1)
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        raise Infeasible()
    if status != pywraplp.Solver.OPTIMAL and status != pywraplp.Solver.FEASIBLE:
        raise SolverTimeout(f"the solver found no plan within {time_limit_s} s (status {status})")
    choice = {v: max(range(len(xs)), key=lambda k: xs[k].solution_value()) for v, xs in m.x.items()}
    return Solution(
        choice,
        problem.cost_of(choice),
        solver.Objective().BestBound(),
        "optimal" if status == pywraplp.Solver.OPTIMAL else "feasible (time limit)",
        solver.NumVariables(),
        solver.NumConstraints(),
        time.perf_counter() - start,
    )


def min_memory(problem: Problem, *, time_limit_s: float = 30.0) -> float:
    """The least per-device memory any allowed assignment needs (to explain an infeasible plan)."""
    m = _Model(problem)
    m.add_one_strategy()
    m.add_edge_links()
    m.add_forced()
    peak = m.solver.NumVar(0, m.solver.infinity(), "peak")
    m.add_memory(peak)
    m.solver.Minimize(peak)
    m.solver.SetTimeLimit(int(time_limit_s * 1000))
    m.solver.Solve()
    return peak.solution_value()
