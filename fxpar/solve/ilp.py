"""The sharding ILP: one strategy per node, minimizing predicted step time under a memory bound.

Nodes are grouped in classes (repeated layers share one decision, ``fxpar.solve.repeat``); below,
v ranges over class representatives and every sum over nodes counts each member.

Variables
  x[v,s] in {0,1}   class v uses strategy s (s in S_v, the strategies its rule allows)
  e[k,a,b] in [0,1] on edge group k = (u -> v, argument j): u's output has spec a and v wants
                    spec b; specs are grouped, so a ranges over u's distinct output specs, b over
                    v's distinct input specs for argument j (a tight linearization of x_u x_v^T)

Objective (seconds)
  min  sum_v sum_s c_v(s) x[v,s]  +  sum_k n_k sum_{a,b} r_k(a,b) e[k,a,b]
  c_v(s): compute time of v's members under s, plus for the loss and updated buffers the reshard
  to replicated; r_k(a,b): time of the reshard a -> b of the edge's tensor (fxpar.reshard,
  fxpar.cost), n_k the number of member edges in group k. The gradient of parameter p is an edge
  from its producer to p, wanting p's own spec: all-reduce (DDP) or reduce-scatter (ZeRO/FSDP)
  falls out of it. An edge whose one side has a single spec is a unary cost on the other side;
  an edge inside one class (u and v tied) is a cost on the diagonal.

Constraints
  add_one_strategy:  sum_s x[v,s] = 1                                         for every class v
  add_edge_links:    sum_b e[k,a,b] = sum_{s: out_k(s)=a} x[u,s],
                     sum_a e[k,a,b] = sum_{s: in_k(s)=b} x[v,s]               for every edge group k
  add_memory:        sum_{p params} sum_s w_p(s) x[p,s] + sum_{v in L} sum_s m_v(s) x[v,s]
                     + sum_{k copied in L} B_k c_k + F_L <= M
                     for the sets L of values live at once (fxpar.solve.problem._liveness: at every
                     position where one dies, and after the graph); w_p counts the parameter and
                     its optimizer state on one device, m_v the bytes of v's outputs on one device
                     (for a parameter p in L: its gradient in p's spec; a node listed twice counts
                     twice), M the device memory. A gradient is live from the node that makes it
                     to the end of the graph; after the graph L holds every gradient twice (the
                     runtime hands a copy, scaled by the loss's gradient, to the parameter) and the
                     inputs and buffers, which live through the step. The copies in L
                     (add_memory_copies), each by its own c_k: a parameter's resharded copy, the
                     largest any of its consumers wants, from its first reader to its last use; the
                     copies resharded for a consumer from other values, at that consumer (one c_k
                     per edge); a gradient's copy into its bucket (at the output node, where the
                     runtime synchronizes gradients):
                       c_k >= (b_e(t) / B_k) (sum_{s: counted spec t} x - sum_{s: other side's spec t} x)
                     for every edge e of the copy and spec t of its counted side (the consumer's for
                     a copy, the producer's for a bucket copy), so c_k is the largest b_e(t)/B_k
                     over the edges that reshard into or out of t, and 0 where none does (B_k its
                     largest copy; c_k has positive
                     coefficients in rows bounded above only, so it takes that least value). F_L:
                     bytes no choice changes (one full bucket where the gradients exceed one).
                     Sets are added lazily: the solve starts with those of largest possible and
                     largest unavoidable size, and any set the solution overflows is added before
                     solving again, so the final plan satisfies every set.
  add_overlap:       z >= G - e B,  z >= (1 - e) G,  z >= G_last,  z >= 0; the objective pays z for G
                     G: the gradient synchronization the runtime runs asynchronously (an edge from
                     a gradient to its parameter resharded by one all-reduce or reduce-scatter),
                     whose cost terms leave the objective; B: the backward compute, behind which
                     it hides; e: the device's overlap efficiency (the share of an async
                     collective's time that can run under compute, measured by calibration);
                     G_last: the sync of the gradients in the step's last bucket, which the
                     runtime issues after the last gradient (problem.last_bucket): all of G for a
                     model whose gradients fill at most one bucket.
                     B counts all backward compute, so the overlap is an optimistic bound.
  add_forced:        x[v,s] = 0 for strategies a caller excluded

Recomputation (``solve(..., recompute=True)``; positions, values, decisions d, hosts p(d), fb, lf,
lu, q and U as defined in ``fxpar.solve.recompute``)
  Variables: r[d] in {0,1} per decision (one per class of repeated layers): d is recomputed;
             y[n,s] in [0,1] for d and each of its values n: n has strategy s and d is recomputed (one per
             class of repeated layers, as x and r);
             A[d,P] in [0,1]: d's copy is made at or before position P (only for P after the loss
             and before fb(d), where a chain of readers can need it); W[v,P], E[v,P] >= 0: bytes
             of an early copy, of a kept input extended for a recomputed reader; q_e >= 0: a
             resharding paid again.
  add_recompute:       y[n,s] <= x[n,s],  sum_s y[n,s] = r[d];  objective += sum_s c_n(s) y[n,s]
                       for d and its getitem nodes (their compute, again)
  add_recompute_comm:  q_e >= T_e - C_e (2 - r[u] - r[w]) for an edge from a copy of u's into a copy
                       of w's (T_e its resharding-time expression, C_e its largest; inside one
                       decision, q_e >= T_e - C_e (1 - r[d])); objective += q_e
  add_recompute_memory (replaces add_memory; one row per position P and the one after the graph,
                       added lazily as above; params: the w_p terms, C_P: add_memory's copy and
                       fixed terms of position P, fxpar.solve.recompute.extras_at, and for each
                       decision w with o(w) < P <= U(w) an indicator Ec >= (its copies' bytes) / B
                       - (1 - r[w]) counted B times: the copies resharded for w's forward use,
                       which its recomputation shares; and for each parameter whose resharded copy
                       a recomputed w reads, with its last use < P <= U(w), one indicator
                       Ep >= c_p - (1 - r[w]) over those w, counted B_p times (c_p its copy's
                       variable): the copy lives on to the recomputation):
                       params + C_P + sum_v [m_v x_v on [o, lf]] + [m_v (x_v - y_v) on (lf, lu]]
                       + [m_v y_v on [fb(d), q(v)]] + W[v,P] + E[v,P] <= M, with
                       A[d,P] >= A[w,P] + r[d] - 1 for each decision w reading d (A[w,P] = r[w]
                       where fb(w) <= P), W[v,P] >= m_v y_v - max m_v (1 - A[d,P]) for P < fb(d),
                       P <= q(v), E[v,P] >= m_v (x_v - y_v) - max m_v (1 - r[w]) for each decision w
                       reading v with lu(v) < P <= U(w). The indicators only appear with positive
                       coefficients in rows bounded above, so each takes its least value, which is
                       the model's exactly; the rows then hold exactly where the model's memory
                       (``fxpar.solve.recompute.recompute_memory``) fits. Recomputation does not
                       enter add_overlap's window, so it never shortens a step.

Simplified problems (``build_problem(simplify=True)``) also keep edges between two cheap ops
(elementwise, views, slicing) free of resharding: sum_{t: in_k(t)=b} x[v,t] <= sum_{s: out_k(s)=b} x[u,s]
for every spec b, with no edge variables; layouts then change only on edges into or out of ops
that do real work (matmuls, reductions, norms, ...) and at parameters and inputs. A cheap op's
output is no larger than what it reads, so resharding before it costs no more. An edge whose
constraint would leave some class with no strategy (a cheap op whose producer cannot give any spec
it takes) is resharded as usual (``fxpar.solve.problem``).

Solving (``solve``): HiGHS (``fxpar.solve.backend``, through OR-Tools' MathOpt) by default
(``solver="HIGHS:name=value,..."`` passes HiGHS options), or SCIP
through ``pywraplp`` (``solver="SCIP"``, the solver fxpar used before), one thread, relative and
absolute gap 0, so a plan reported ``optimal`` is proven optimal; at the time limit the best plan
found is returned with the solver's bound. The objective and the overlap rows are passed in units
of ``_scale`` (a reference plan costs 1e4), keeping the solvers' absolute tolerances far below any
difference between plans; every figure reported is in seconds, recomputed from the chosen strategies.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from ortools.linear_solver import pywraplp
from torch.fx import Node

from fxpar.cost import spec_bytes
from fxpar.solve.backend import HighsSolver
from fxpar.solve.problem import OPTIMIZER_STATE_FACTOR, Problem, build_problem  # noqa: F401  (re-exported)
from fxpar.solve.recompute import analysis_of, extras_at, memory_profile, recompute_edges, recompute_time

# Mixed-integer solvers OR-Tools ships that solve this model exactly (docs/solver-scale.md
# compares them): HiGHS is the default, SCIP the solver fxpar used before.
SOLVERS = ("HIGHS", "SCIP")
DEFAULT_SOLVER = "HIGHS"
# The objective is passed to the solver in units of a reference plan's step time divided by this
# (seconds are 1e-4 on small models): solvers' tolerances (HiGHS's dual feasibility 1e-7, its
# absolute gap 1e-6) then stay far below any difference between plans. At 1e6 HiGHS warned of
# excessively large costs (up to 2e7 on HF T5) and its root LP took 4.3 s on HF T5 2x2 against
# about 2 s at 1e4, with the same optimum on every case of tools/zoo_plan_times.py and
# tools/plan_scale.py (docs/solver-scale.md). Reported figures are in seconds.
_OBJECTIVE_SCALE = 1e4

_INITIAL_SETS = 8
_SETS_PER_ROUND = 8
_MAX_ROUNDS = 30


@dataclass
class Solution:
    choice: dict[Node, int]
    objective: float
    bound: float
    status: str
    num_variables: int
    num_constraints: int
    solve_seconds: float
    num_classes: int = 0
    num_memory_sets: int = 0
    recompute: list[Node] = field(default_factory=list)  # decisions recomputed, in graph order
    start: str = ""  # the starting plan returned as it is (the solver found none faster in time), if any

    @property
    def gap(self) -> float:
        return 0.0 if self.objective <= 0 else max(0.0, (self.objective - self.bound) / self.objective)


class Infeasible(Exception):
    pass


class SolverTimeout(Exception):
    pass


def parse_solver(solver: str) -> tuple[str, dict[str, str]]:
    """``"NAME"`` or ``"HIGHS:option=value,..."`` -> (name, HiGHS options); NAME one of ``SOLVERS``."""
    name, _, rest = solver.partition(":")
    if name not in SOLVERS or (rest and name != "HIGHS"):
        raise ValueError(f"unknown solver {solver!r}; known: {list(SOLVERS)}, HiGHS as 'HIGHS:option=value,...'")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"solver {solver!r}: HiGHS option {item!r} is not name=value")
        options[key] = value
    return name, options


class _Model:
    def __init__(self, problem: Problem, solver: str = DEFAULT_SOLVER, options: dict | None = None):
        name, parsed = parse_solver(solver)
        options = {**parsed, **(options or {})}
        self.p = problem
        self.solver = HighsSolver(options) if name == "HIGHS" else pywraplp.Solver.CreateSolver(name)
        assert self.solver is not None, f"OR-Tools was built without {solver}"
        self.solver.SetNumThreads(1)  # one thread: the same problem gives the same plan
        if os.environ.get("FXPAR_SOLVER_LOG"):
            self.solver.EnableOutput()
        self.scale = 1.0  # solver units per second of objective (see _OBJECTIVE_SCALE)
        self.reps: list[Node] = list(dict.fromkeys(problem.rep(n) for n in problem.nodes))
        self.x: dict[Node, list] = {}
        self.obj: dict = defaultdict(float)
        # Overlap: gradient sync that may hide behind backward compute (see add_overlap).
        self.grad_terms: dict = defaultdict(float)
        self.last_terms: dict = defaultdict(float)
        self.window_terms: dict = defaultdict(float)
        self.memory_rows: list = []
        self.z = None
        self.edge_expr: dict = {}  # edge -> {variable: seconds}: its resharding time
        # Recomputation (add_recompute): the analysis, r[d] per decision, y[n] per node and strategy.
        self.rc = None
        self.r: dict[Node, object] = {}
        self.y: dict[Node, list] = {}
        # Called between steps of a long build; raises SolverTimeout once the limit is spent.
        self.spent = lambda: None

    def xs(self, node: Node) -> list:
        return self.x[self.p.rep(node)]

    def add_one_strategy(self) -> None:
        s = self.solver
        for i, v in enumerate(self.reps):
            xs = [s.BoolVar(f"x{i}_{k}") for k in range(len(self.p.strategies[v]))]
            self.x[v] = xs
            row = s.Constraint(1, 1)
            for x in xs:
                row.SetCoefficient(x, 1)
        for n in self.p.nodes:
            backward = n in self.p.backward
            for x, c in zip(self.xs(n), self.p.node_cost[n]):
                if c:
                    self.obj[x] += c
                    if backward:
                        self.window_terms[x] += c

    def add_edge_links(self) -> None:
        s = self.solver
        p = self.p
        groups: dict[tuple, list] = defaultdict(list)
        for e in p.edges:
            # Class members have equal strategy lists, so one member edge stands for the group.
            key = (p.rep(e.producer), e.out_index, p.rep(e.consumer), e.position)
            groups[key].append(e)
        for k, members in enumerate(groups.values()):
            self.spent()
            e, count = members[0], len(members)
            num_last = sum(1 for m in members if m in p.last_grads)
            xu, xv = self.xs(e.producer), self.xs(e.consumer)
            expr: dict = defaultdict(float)  # one member edge's resharding time, as a linear expression
            for m in members:
                self.edge_expr[m] = expr

            def add_cost(var, a, b, cost, e=e, count=count, num_last=num_last, expr=expr):
                if not cost:
                    return
                expr[var] += cost
                if p.overlappable(e, a, b):
                    self.grad_terms[var] += count * cost
                    if num_last:
                        self.last_terms[var] += num_last * cost
                else:
                    self.obj[var] += count * cost

            from_param = e.producer in p.param_mem
            if xu is xv:
                for x, a, b in zip(xu, e.out_specs, e.in_specs):
                    add_cost(x, a, b, p.reshard_cost(e.tensor, a, b))
                continue
            a_specs = sorted(set(e.out_specs), key=repr)
            b_specs = sorted(set(e.in_specs), key=repr)
            if len(a_specs) > 1 and len(b_specs) > 1 and e in p.no_reshard:
                # The consumer takes the producer's output as it is: no edge variables.
                for b in b_specs:
                    row = s.Constraint(-s.infinity(), 0)
                    for x, spec in zip(xv, e.in_specs):
                        if spec == b:
                            row.SetCoefficient(x, 1)
                    for x, spec in zip(xu, e.out_specs):
                        if spec == b:
                            row.SetCoefficient(x, -1)
                continue
            costs = p.cost_matrix(e.tensor, a_specs, b_specs)
            if len(a_specs) == 1:
                for x, b in zip(xv, e.in_specs):
                    add_cost(x, a_specs[0], b, costs[(a_specs[0], b)])
                continue
            if len(b_specs) == 1:
                for x, a in zip(xu, e.out_specs):
                    add_cost(x, a, b_specs[0], costs[(a, b_specs[0])])
                continue
            if not any(costs.values()) and not from_param:
                continue
            ev = {(a, b): s.NumVar(0, 1, f"e{k}_{ia}_{ib}") for ia, a in enumerate(a_specs) for ib, b in enumerate(b_specs)}
            for a in a_specs:
                row = s.Constraint(0, 0)
                for b in b_specs:
                    row.SetCoefficient(ev[(a, b)], 1)
                for x, spec in zip(xu, e.out_specs):
                    if spec == a:
                        row.SetCoefficient(x, -1)
            for b in b_specs:
                row = s.Constraint(0, 0)
                for a in a_specs:
                    row.SetCoefficient(ev[(a, b)], 1)
                for x, spec in zip(xv, e.in_specs):
                    if spec == b:
                        row.SetCoefficient(x, -1)
            for key, var in ev.items():
                add_cost(var, key[0], key[1], costs[key])

    def add_memory(self, live: list[Node], bound, bound_var=None) -> None:
        """The memory row of live set ``live`` (a ``LiveSet``): ``bound`` bytes, or ``bound_var`` (a
        variable, in bytes) when minimizing the peak. Byte counts of a large model (1e11) beside the
        objective's coefficients (~1) make a matrix range that the solver handles badly, so the row
        is divided by the bound (or, minimizing, by its largest coefficient), so the solver's
        feasibility tolerance is relative to the device's memory. With no bound (an infinite
        memory) the row holds always and is not added."""
        if bound_var is None and math.isinf(bound):
            return
        coef: dict = defaultdict(float, self.add_memory_resident())
        for v in live:
            for x, m in zip(self.xs(v), self.p.act_mem[v]):
                if m:
                    coef[x] += m
        self.add_memory_copies(coef, getattr(live, "copies", ()))
        self._add_row(coef, bound - getattr(live, "fixed", 0.0), bound_var)

    def add_memory_resident(self) -> dict:
        """{variable: bytes} every memory row holds: each parameter with its optimizer state,
        ``Problem.resident_param_bytes`` (made once)."""
        if getattr(self, "_resident", None) is None:
            p = self.p
            self._resident = defaultdict(float)
            for param in p.param_mem:
                for k, x in enumerate(self.xs(param)):
                    self._resident[x] += p.resident_param_bytes(param, k)
        return self._resident

    def add_memory_copies(self, coef: dict, items) -> None:
        """Adds to ``coef`` the bytes of ``LiveSet`` copy items (``Problem.copy_bytes``). Each item
        gets one variable c >= 0, in units of its largest copy B, made once with one row per edge
        of the item and spec t: c >= (bytes(t) / B) (sum of x on the side whose spec t is counted -
        sum of x on the other side with spec t), which is bytes(t)/B exactly where that edge
        reshards into (a value's copy) or out of (a gradient's bucket copy) spec t and at most 0
        elsewhere, so c is at least the item's largest copy; c appears only in rows bounded above,
        so it takes that least value."""
        p = self.p
        if getattr(self, "_copy_vars", None) is None:
            self._copy_vars = {}
        for item in items:
            grad = item[2] == "grad"
            # A parameter's copy is the largest of its consumers' (one variable); a consumer's
            # copies add up (a variable per edge). Members of one class may feed different
            # consumers: variables are per item, not per class.
            groups = [(item, p.copy_edges(item))] if item[2] == "param" else [((item, i), [e]) for i, e in enumerate(p.copy_edges(item))]
            for key, edges in groups:
                self.add_memory_copy_var(coef, key, edges, grad)

    def add_memory_copy_var(self, coef: dict, key, edges, grad: bool) -> None:
        """One copy variable (see add_memory_copies) over ``edges``, made once per ``key``."""
        p, s = self.p, self.solver
        mesh = p.cost_model.mesh_shape
        if key not in self._copy_vars:
            # (bytes of spec t, x with the counted spec t, x of the other side with spec t) per edge
            parts = []
            for e in edges:
                counted, other = (e.out_specs, e.in_specs) if grad else (e.in_specs, e.out_specs)
                x_counted, x_other = (self.xs(e.producer), self.xs(e.consumer)) if grad else (self.xs(e.consumer), self.xs(e.producer))
                if len(set(counted) | set(other)) == 1:
                    continue  # one spec on both sides: never resharded
                for t in set(counted):
                    parts.append((float(spec_bytes(e.tensor, t, mesh)),
                                  [x for x, spec in zip(x_counted, counted) if spec == t],
                                  [x for x, spec in zip(x_other, other) if spec == t]))
            biggest = max((size for size, _, _ in parts), default=0.0)
            if biggest <= 0:
                self._copy_vars[key] = None
            else:
                c = s.NumVar(0, s.infinity(), f"c{len(self._copy_vars)}")
                for size, pos, neg in parts:
                    terms: dict = defaultdict(float)
                    for x in pos:
                        terms[x] += size / biggest
                    for x in neg:
                        terms[x] -= size / biggest
                    row = s.Constraint(0, s.infinity())
                    row.SetCoefficient(c, 1)
                    for x, v in terms.items():
                        if v:
                            row.SetCoefficient(x, -v)
                self._copy_vars[key] = (c, biggest)
        made = self._copy_vars[key]
        if made is not None:
            coef[made[0]] += made[1]

    def _add_row(self, coefficients: dict, bound, bound_var=None) -> None:
        unit = 1.0 / max(float(bound), max(coefficients.values(), default=0.0), 1.0)
        row = self.solver.Constraint(-self.solver.infinity(), bound * unit)
        for x, c in coefficients.items():
            row.SetCoefficient(x, c * unit)
        if bound_var is not None:
            # The peak variable counts units of peak_unit bytes (min_memory): a coefficient of
            # -1/(1e9 bytes) would fall below the solver's smallest matrix entry and be dropped.
            row.SetCoefficient(bound_var, -unit * getattr(self, "peak_unit", 1.0))
        self.memory_rows.append(row)

    def add_recompute(self) -> None:
        """r[d] binary per decision (one per class of repeated layers); y[n,s] = x[n,s] r[d] for d and
        each of its values n: y[n,s] <= x[n,s], sum_s y[n,s] = r[d], one y per class of n and r (the
        members of a class of repeated layers share x and r, so their y are equal). The objective
        pays the compute of d and its getitem nodes again."""
        s, p = self.solver, self.p
        a = self.rc = analysis_of(p)
        keys: dict[Node, object] = {}
        ys_of: dict[tuple, list] = {}  # (class of n, decision key) -> y[n]
        for i, d in enumerate(sorted(a.decisions, key=a.order.__getitem__)):
            key = p.rep(d) if p.rep(d) in a.decisions else d
            if key not in keys:
                keys[key] = s.BoolVar(f"r{i}")
            r = self.r[d] = keys[key]
            for n in dict.fromkeys([d, *a.decisions[d].values]):
                # Members of one class whose decisions share r share x and r, so y = x r too.
                shared = (p.rep(n), key)
                if shared in ys_of:
                    self.y[n] = ys_of[shared]
                    continue
                ys = self.y[n] = ys_of[shared] = [s.NumVar(0, 1, f"y{n.name}_{k}") for k in range(len(p.strategies[n]))]
                total = s.Constraint(0, 0)
                total.SetCoefficient(r, -1)
                for yv, xv in zip(ys, self.xs(n)):
                    total.SetCoefficient(yv, 1)
                    row = s.Constraint(-s.infinity(), 0)
                    row.SetCoefficient(yv, 1)
                    row.SetCoefficient(xv, -1)
            for n in [d, *a.decisions[d].getitems]:
                for yv, c in zip(self.y[n], p.node_cost[n]):
                    if c:
                        self.obj[yv] += c

    def add_recompute_comm(self) -> None:
        """q_e >= T_e - C_e (2 - r[u] - r[w]), q_e >= 0 for an edge from a copy of u into a copy of w
        (T_e: its resharding time, C_e its largest; u = w inside one decision: q_e >= T_e - C_e (1 - r[w])).
        The objective pays q_e."""
        s, p, k = self.solver, self.p, self.scale
        for e, du, dc in recompute_edges(p):
            expr = self.edge_expr.get(e)
            if not expr:
                continue
            biggest = max(p.cost_matrix(e.tensor, sorted(set(e.out_specs), key=repr), sorted(set(e.in_specs), key=repr)).values())
            rs = [self.r[du]] if du is dc else [self.r[du], self.r[dc]]
            q = s.NumVar(0, s.infinity(), f"q{e.consumer.name}_{e.position}")
            self.obj[q] += 1.0
            row = s.Constraint(-k * biggest * len(rs), s.infinity())
            row.SetCoefficient(q, k)
            for var, c in expr.items():
                row.SetCoefficient(var, -k * c)
            coef: dict = defaultdict(float)
            for r in rs:
                coef[r] -= k * biggest
            for r, c in coef.items():
                row.SetCoefficient(r, c)

    def recompute_coefficients(self, pos: int) -> dict:
        """The memory at position ``pos`` (see fxpar.solve.recompute) as {variable: bytes}; adds the
        indicator rows it needs: A[d] >= A[w] + r[d] - 1 (d's copy is made by pos: a recomputed
        reader's is, A[w] = r[w] where fb(w) <= pos), W >= sum_s m(s) y[v,s] - M (1 - A[d]) for a
        copy made early, E >= kept bytes - M (1 - r[w]) for a kept input of a recomputed w."""
        s, p, a = self.solver, self.p, self.rc
        coef: dict = defaultdict(float)
        decisions = a.decisions
        # A(d, pos) for decisions whose copy a chain of recomputed readers may need by pos.
        early: dict[Node, object] = {}
        if pos > a.loss_pos:
            for d in sorted(decisions, key=a.order.__getitem__, reverse=True):
                dec = decisions[d]
                if dec.first_late <= pos:
                    continue
                feeders = [w for w in dec.readers if decisions[w].first_late <= pos or w in early]
                if not feeders:
                    continue
                av = early[d] = s.NumVar(0, 1, f"A{d.name}_{pos}")
                for w in feeders:
                    row = s.Constraint(-1, s.infinity())
                    row.SetCoefficient(av, 1)
                    row.SetCoefficient(self.r[d], -1)
                    row.SetCoefficient(early.get(w, self.r[w]), -1)

        def indicator(terms: dict, biggest: float, switch, name: str):
            """A variable >= (terms - biggest (1 - switch)) / biggest: bytes in units of biggest
            (a variable in bytes would have a coefficient of 1/M in the scaled memory row, below the
            solver's smallest matrix entry for a large M)."""
            var = s.NumVar(0, s.infinity(), name)
            row = s.Constraint(-1, s.infinity())
            row.SetCoefficient(var, 1)
            for x, c in terms.items():
                row.SetCoefficient(x, -c / biggest)
            row.SetCoefficient(switch, -1)
            return var

        for v in a.values.values():
            ms = p.act_mem.get(v.node)
            if ms is None or not any(ms):
                continue
            xs, d = self.xs(v.node), v.decision
            ys = self.y.get(v.node) if d is not None else None
            if v.start <= pos <= v.last_forward:
                for x, m in zip(xs, ms):
                    coef[x] += m
            elif v.last_forward < pos <= v.last_use:
                for x, m in zip(xs, ms):
                    coef[x] += m
                for yv, m in zip(ys or (), ms):
                    coef[yv] -= m
            if ys is not None:
                dec = decisions[d]
                if dec.first_late <= pos <= v.copy_end:
                    for yv, m in zip(ys, ms):
                        coef[yv] += m
                elif pos < dec.first_late and pos <= v.copy_end and d in early:
                    w = indicator(dict(zip(ys, ms)), max(ms), early[d], f"W{v.node.name}_{pos}")
                    coef[w] += max(ms)
            readers = [w for w in v.readers if v.last_use < pos <= decisions[w].latest_host]
            if readers:
                kept: dict = defaultdict(float)
                for x, m in zip(xs, ms):
                    kept[x] += m
                for yv, m in zip(ys or (), ms):
                    kept[yv] -= m
                ext = s.NumVar(0, s.infinity(), f"E{v.node.name}_{pos}")
                for w in dict.fromkeys(self.r[w] for w in readers):
                    row = s.Constraint(-1, s.infinity())
                    row.SetCoefficient(ext, 1)
                    for x, c in kept.items():
                        row.SetCoefficient(x, -c / max(ms))
                    row.SetCoefficient(w, -1)
                coef[ext] += max(ms)
        return coef

    def add_recompute_memory(self, pos: int, bound, bound_var=None) -> None:
        """The memory row of position ``pos`` with recomputation (scaled as in add_memory): the
        parameters with their optimizer state, the activations (recompute_coefficients, less its
        parameter terms), and what the step holds there besides (``fxpar.solve.recompute.extras_at``).
        With no bound (an infinite memory) the row holds always and is not added."""
        if bound_var is None and math.isinf(bound):
            return
        coef = self.recompute_coefficients(pos)
        for var, c in self.add_memory_resident().items():
            coef[var] += c
        a = analysis_of(self.p)
        nodes, copies, fixed = extras_at(a, pos)
        for v in nodes:
            for x, m in zip(self.xs(v), self.p.act_mem[v]):
                if m:
                    coef[x] += m
        self.add_memory_copies(coef, copies)
        # The copies resharded for a recomputed w's forward use live on to U(w): an indicator
        # E >= (their bytes) / B - (1 - r[w]), in units of B, their largest total.
        s = self.solver
        for w, dec in a.decisions.items():
            if not a.order[w] < pos <= dec.latest_host:
                continue
            terms: dict = defaultdict(float)
            self.add_memory_copies(terms, [(None, w, "act")])
            biggest = sum(terms.values())
            if biggest <= 0:
                continue
            ext = s.NumVar(0, s.infinity(), f"Ec{w.name}_{pos}")
            row = s.Constraint(-1, s.infinity())
            row.SetCoefficient(ext, 1)
            for var, c in terms.items():
                row.SetCoefficient(var, -c / biggest)
            row.SetCoefficient(self.r[w], -1)
            coef[ext] += biggest
        # A parameter's copy read by a recomputed w lives on to U(w) (param_extensions): one
        # indicator per parameter, E >= c - (1 - r[w]) for each such w (c: the copy's variable).
        from fxpar.solve.recompute import param_extensions

        readers: dict = {}
        for w, item, lo, hi in param_extensions(a):
            if lo <= pos <= hi:
                readers.setdefault(item, []).append(w)
        for item, ws in readers.items():
            terms = defaultdict(float)
            self.add_memory_copies(terms, [item])
            biggest = sum(terms.values())
            if biggest <= 0:
                continue
            ext = s.NumVar(0, s.infinity(), f"Ep{item[0].name}_{pos}")
            for r in dict.fromkeys(self.r[w] for w in ws):
                row = s.Constraint(-1, s.infinity())
                row.SetCoefficient(ext, 1)
                for var, c in terms.items():
                    row.SetCoefficient(var, -c / biggest)
                row.SetCoefficient(r, -1)
            coef[ext] += biggest
        self._add_row({var: c for var, c in coef.items() if c}, bound - fixed, bound_var)

    def add_overlap(self) -> None:
        """z >= G - e B, z >= (1 - e) G, z >= G_last, z >= 0; the objective pays z instead of G."""
        if not self.grad_terms:
            return
        s = self.solver
        self.z = z = s.NumVar(0, s.infinity(), "exposed_grad_sync")
        self.obj[z] += 1.0
        k = self.scale  # rows in solver units, like the objective
        self.add_window()
        row = s.Constraint(0, s.infinity())
        row.SetCoefficient(z, k)
        for x, c in self.last_terms.items():
            row.SetCoefficient(x, -k * c)
        if self.p.overlap_efficiency < 1:
            row = s.Constraint(0, s.infinity())
            row.SetCoefficient(z, k)
            for x, c in self.grad_terms.items():
                row.SetCoefficient(x, -k * (1 - self.p.overlap_efficiency) * c)

    def add_window(self) -> None:
        """z >= G - e B: gradient sync beyond the backward compute it hides behind is exposed."""
        s, k = self.solver, self.scale
        row = s.Constraint(0, s.infinity())
        row.SetCoefficient(self.z, k)
        coef: dict = defaultdict(float)
        for x, c in self.grad_terms.items():
            coef[x] -= c
        for x, c in self.window_terms.items():
            coef[x] += self.p.overlap_efficiency * c
        for x, c in coef.items():
            row.SetCoefficient(x, k * c)

    def add_forced(self) -> None:
        for v, allowed in self.p.forced.items():
            for k, x in enumerate(self.xs(v)):
                if k not in allowed:
                    x.SetUb(0)

    def set_objective(self) -> None:
        objective = self.solver.Objective()
        for x, c in self.obj.items():
            objective.SetCoefficient(x, self.scale * c)
        objective.SetMinimization()

    def set_hint(self, hint: dict[Node, int], recompute=None) -> None:
        """The strategies of ``hint`` as the solver's starting point (its binaries only); with
        ``recompute`` (decisions, on a model with add_recompute), also r, 1 for the classes of those
        decisions, and y = x r."""
        values = {x: float(k == hint[v]) for v, xs in self.x.items() if v in hint for k, x in enumerate(xs)}
        if recompute is not None and self.rc is not None:
            on = {self.r[d] for d in recompute}
            for r in self.r.values():
                values[r] = float(r in on)
            for d, r in self.r.items():
                for n in [d, *self.rc.decisions[d].values]:
                    for k, yv in enumerate(self.y[n]):
                        values[yv] = float(r in on and k == hint[self.p.rep(n)])
        if isinstance(self.solver, HighsSolver):
            self.solver.SetHint(values)
        else:
            self.solver.SetHint(list(values), list(values.values()))

    def choice(self) -> dict[Node, int]:
        best = {v: max(range(len(xs)), key=lambda k: xs[k].solution_value()) for v, xs in self.x.items()}
        return {n: best[self.p.rep(n)] for n in self.p.nodes}

    def recomputed(self) -> list[Node]:
        """The decisions the solution recomputes whose copy something uses, in graph order."""
        if self.rc is None:
            return []
        chosen = [d for d, r in self.r.items() if r.solution_value() > 0.5]
        hosts = self.rc.hosts(chosen)
        return sorted((d for d in chosen if hosts[d] < float("inf")), key=self.rc.order.__getitem__)


def _exact_params() -> pywraplp.MPSolverParameters:
    """Solve to optimality: a default relative gap would let near-optimal plans through."""
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, 0.0)
    return params


def _initial_sets(problem: Problem) -> list[int]:
    """Live sets most likely to bind: largest if everything is replicated, largest at best."""
    act = problem.act_mem
    top = lambda sizes: sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True)[:_INITIAL_SETS]  # noqa: E731
    most = top(problem.per_live_set(lambda v: max(act[v]), lambda item: 0.0, fixed=False).tolist())
    least = top(problem.per_live_set(lambda v: min(act[v]), lambda item: 0.0, fixed=False).tolist())
    return list(dict.fromkeys(most + least))


def _overflowing(problem: Problem, choice: dict[Node, int], limit: float, added: set[int]) -> list[int]:
    params = problem.param_memory(choice)
    sets = problem.live_set_memories(choice).tolist()
    over = [(params + m - limit, i) for i, m in enumerate(sets) if i not in added]
    over = [(o, i) for o, i in over if o > 1e-6 * max(1.0, limit)]
    return [i for _, i in sorted(over, reverse=True)[:_SETS_PER_ROUND]]


def _initial_positions(problem: Problem) -> list[int]:
    """Positions most likely to bind with recomputation: largest if everything is replicated and
    kept, largest at best (the counterparts of _initial_sets)."""
    act = problem.act_mem
    a = analysis_of(problem)
    out = []
    for pick in (max, min):
        prof = a.profile((), lambda v, pick=pick: pick(act[v]) if v in act else 0.0)
        out += sorted(range(len(prof)), key=lambda i: prof[i], reverse=True)[:_INITIAL_SETS]
    return list(dict.fromkeys(out))


def _overflowing_positions(problem: Problem, choice, recompute, limit: float, added: set[int]) -> list[int]:
    params = problem.param_memory(choice)
    prof = memory_profile(problem, choice, recompute)
    over = [(params + m - limit, i) for i, m in enumerate(prof) if i not in added]
    over = [(o, i) for o, i in over if o > 1e-6 * max(1.0, limit)]
    return [i for _, i in sorted(over, reverse=True)[:_SETS_PER_ROUND]]


def _scale(problem: Problem) -> float:
    """Solver units per second: a reference plan (every node's first strategy) costs _OBJECTIVE_SCALE."""
    reference = problem.cost_of({n: 0 for n in problem.nodes})
    return _OBJECTIVE_SCALE / reference if reference > 0 else 1.0


def _add_rows(m: _Model, problem: Problem, recompute: bool, bound, bound_var=None) -> set[int]:
    """The first memory rows: live sets (positions, with recomputation) most likely to bind."""
    if recompute:
        added = set(_initial_positions(problem))
        for pos in added:
            m.add_recompute_memory(pos, bound, bound_var)
        return added
    added = set(_initial_sets(problem)) if problem.live_sets else set()
    for i in added:
        m.add_memory(problem.live_sets[i], bound, bound_var)
    if not problem.live_sets:
        m.add_memory([], bound, bound_var)
    return added


def _more_rows(m: _Model, problem: Problem, recompute: bool, limit: float, added: set[int], bound, bound_var=None) -> bool:
    """Adds the rows of the sets (positions) the solution overflows; False when there are none."""
    choice = m.choice()
    if recompute:
        new = _overflowing_positions(problem, choice, m.recomputed(), limit, added)
    else:
        new = _overflowing(problem, choice, limit, added)
    for i in new:
        added.add(i)
        if recompute:
            m.add_recompute_memory(i, bound, bound_var)
        else:
            m.add_memory(problem.live_sets[i], bound, bound_var)
    return bool(new)


def solve(problem: Problem, *, time_limit_s: float = 60.0, solver: str = DEFAULT_SOLVER, recompute: bool = False,
          presolve: bool = True, hint: dict[Node, int] | None = None, hint_recompute=None,
          options: dict | None = None) -> Solution:
    """The optimal assignment of ``problem`` (``solver``: one of ``SOLVERS``); at the time limit,
    the best found, with the solver's bound. With ``recompute``, the solver also chooses which
    activations to recompute (``Solution.recompute``). With ``presolve`` (the default) the problem
    is first reduced exactly and warm-started (``fxpar.solve.presolve``, ``fxpar.solve.warmstart``);
    ``hint`` is a starting assignment (strategy index per node) handed to the solver, with
    ``hint_recompute`` the decisions it recomputes. ``options``: HiGHS options over those of
    ``solver`` (a relative gap other than 0 makes ``optimal`` mean within that gap)."""
    if presolve:
        from fxpar.solve.warmstart import solve_presolved

        return solve_presolved(problem, time_limit_s=time_limit_s, solver=solver, recompute=recompute)
    start = time.perf_counter()

    def spent() -> None:
        # Building the model counts against the limit: stop between steps once it is spent.
        if time.perf_counter() - start >= time_limit_s:
            raise SolverTimeout(f"the time limit ({time_limit_s:.3g} s) was spent building the model")

    m = _Model(problem, solver, options)
    m.spent = spent
    m.scale = _scale(problem)
    m.add_one_strategy()
    m.add_edge_links()
    spent()
    if recompute:
        m.add_recompute()
        spent()
        m.add_recompute_comm()
        spent()
    m.add_overlap()
    m.add_forced()
    m.set_objective()
    if hint is not None:
        m.set_hint(hint, hint_recompute if recompute else None)
    added = _add_rows(m, problem, recompute, problem.memory_budget)
    spent()
    solver = m.solver
    for _ in range(_MAX_ROUNDS):
        remaining = time_limit_s - (time.perf_counter() - start)
        if remaining <= 0:  # a round's memory rows added after the limit: its plan is not known to fit
            raise SolverTimeout(f"the time limit ({time_limit_s:.3g} s) was spent before the memory rows settled")
        solver.SetTimeLimit(max(1, int(remaining * 1000)))
        status = solver.Solve(_exact_params())
        if status == pywraplp.Solver.INFEASIBLE:
            raise Infeasible()
        if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            raise SolverTimeout(f"the solver found no plan within {time_limit_s} s (status {status})")
        if not _more_rows(m, problem, recompute, problem.memory_budget, added, problem.memory_budget):
            break
    else:
        raise SolverTimeout(f"memory constraints did not settle in {_MAX_ROUNDS} rounds")
    choice = m.choice()
    chosen = m.recomputed()
    return Solution(
        choice,
        problem.cost_of(choice) + (recompute_time(problem, choice, chosen) if chosen else 0.0),
        solver.Objective().BestBound() / m.scale,
        "optimal" if status == pywraplp.Solver.OPTIMAL else "feasible (time limit)",
        solver.NumVariables(),
        solver.NumConstraints(),
        time.perf_counter() - start,
        num_classes=len(m.reps),
        num_memory_sets=len(added),
        recompute=chosen,
    )


def min_memory(problem: Problem, *, time_limit_s: float = 30.0, solver: str = DEFAULT_SOLVER, recompute: bool = False) -> float:
    """The least per-device memory any allowed assignment needs (to explain an infeasible plan);
    with ``recompute``, when any activations may also be recomputed. Where the time limit stops
    the search, the least memory found (an upper bound; nan when none was found):
    ``min_memory_found`` says which."""
    return min_memory_found(problem, time_limit_s=time_limit_s, solver=solver, recompute=recompute)[0]


def min_memory_found(problem: Problem, *, time_limit_s: float = 30.0, solver: str = DEFAULT_SOLVER,
                     recompute: bool = False) -> tuple[float, bool]:
    """(``min_memory``'s bytes, whether they are proven the least: False where the time limit
    stopped the search first)."""
    m = _Model(problem, solver)
    m.add_one_strategy()
    m.add_edge_links()
    if recompute:
        m.add_recompute()
    m.add_forced()
    peak = m.solver.NumVar(0, m.solver.infinity(), "peak")
    # The peak in units of a reference plan's memory (every node's first strategy), so it is ~1.
    m.peak_unit = max(1.0, problem.memory_of({n: 0 for n in problem.nodes}))
    added = _add_rows(m, problem, recompute, 0, peak)
    objective = m.solver.Objective()
    objective.SetCoefficient(peak, 1)
    objective.SetMinimization()
    deadline = time.perf_counter() + time_limit_s
    found = math.nan  # the memory of the last assignment found: achievable, so an upper bound
    for _ in range(_MAX_ROUNDS):
        m.solver.SetTimeLimit(max(1, int((deadline - time.perf_counter()) * 1000)))
        status = m.solver.Solve(_exact_params())
        if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            return found, False  # out of time before any (further) assignment
        found = memory_of(problem, m.choice(), m.recomputed() if recompute else None)
        if status != pywraplp.Solver.OPTIMAL:
            return found, False
        if not _more_rows(m, problem, recompute, peak.solution_value() * m.peak_unit, added, 0, peak):
            return found, True  # the optimum of the rows so far overflows none of the others
        if time.perf_counter() >= deadline:
            return found, False
    return found, False


def memory_of(problem: Problem, choice: dict[Node, int], recompute=None) -> float:
    """Peak bytes per device of ``choice``; with ``recompute`` (decisions), under the recomputation
    model (``fxpar.solve.recompute``)."""
    if recompute is None:
        return problem.memory_of(choice)
    from fxpar.solve.recompute import recompute_memory

    return recompute_memory(problem, choice, recompute)
