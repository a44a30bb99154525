"""Warm starts: plans of forced families handed to the solver as its first incumbent.

A family fixes every parameter's spec: data parallel (every parameter replicated) and fully
sharded (every parameter split along its first dimension that divides over each mesh axis, as
FSDP/ZeRO-3 do; replicated where none divides). The rest of the plan is completed greedily in
graph order: each class takes, at its first member, the strategy of least compute plus resharding
from the strategies its producers already took, among those whose parameter spec the family fixes
and that leave every class a strategy its no-reshard edges allow. The completed plan is evaluated directly (``Problem.cost_of``,
``Problem.memory_of``); the cheapest one that fits the memory is the hint, and ``solve_presolved``
never returns a plan slower than it: at a time limit the solver's incumbent is at least as good
(HiGHS keeps the hint as its first incumbent), and the hint itself is returned otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from torch.fx import Node

from fxpar.placement import R, Shard
from fxpar.solve.axis_search import improve_by_axes
from fxpar.solve.presolve import Reduction, lift, presolve
from fxpar.solve.problem import Problem, several

FAMILIES = ("data parallel", "fully sharded")

# The clock every limit is measured on (``solve_with_recompute``, ``solve_presolved``); a test may
# replace it to check the limits handed down without timing anything.
clock = time.perf_counter


def _family_spec(problem: Problem, param: Node, family: str):
    mesh = problem.cost_model.mesh_shape
    if family == "data parallel":
        return (R,) * len(mesh)
    shape = tuple(param.meta["val"].shape)
    for dim, size in enumerate(shape):
        total = 1
        for n in mesh:
            total *= n
        if size % total == 0:
            return (Shard(dim),) * len(mesh)
    return (R,) * len(mesh)


def greedy_plan(problem: Problem, family: str, *, least_memory: bool = False) -> dict[Node, int] | None:
    """The family's plan completed greedily (see the module's docstring); None if some class has no
    allowed strategy. Each choice is propagated along the no-reshard edges (a neighbour keeps the
    strategies whose spec the choice still allows), and a choice that would leave a class with
    none is passed over for the next cheapest. With ``least_memory``, each class takes the
    strategy of fewest output bytes per device first, the cheapest of those."""
    p = problem
    rep = p.rep
    inputs: dict[Node, list] = {}
    for e in p.edges:
        if e.position >= 0:
            inputs.setdefault(e.consumer, []).append(e)
    constrained: dict[Node, list] = {}
    for e in p.no_reshard:
        u, w = rep(e.producer), rep(e.consumer)
        if u is not w and several(e.out_specs) and several(e.in_specs):
            constrained.setdefault(u, []).append(e)
            constrained.setdefault(w, []).append(e)
    alive: dict[Node, set[int]] = {}
    for n in p.nodes:
        v = rep(n)
        if v not in alive:
            alive[v] = {k for k in range(len(p.strategies[v])) if v not in p.forced or k in p.forced[v]}

    def narrow(v: Node, ks: set[int]) -> dict[Node, set[int]] | None:
        """The alive sets after restricting v to ks (only those that change), or None if one empties."""
        new = {v: ks}
        todo = [v]
        while todo:
            x = todo.pop()
            for e in constrained.get(x, ()):
                u, w = rep(e.producer), rep(e.consumer)
                au, aw = new.get(u, alive[u]), new.get(w, alive[w])
                given = {e.out_specs[k] for k in au}
                wanted = {e.in_specs[k] for k in aw}
                lw = {k for k in aw if e.in_specs[k] in given}
                lu = {k for k in au if e.out_specs[k] in wanted}
                for y, old, left in ((w, aw, lw), (u, au, lu)):
                    if not left:
                        return None
                    if left != old:
                        new[y] = left
                        todo.append(y)
        return new

    chosen: dict[Node, int] = {}
    for n in p.nodes:
        v = rep(n)
        if v in chosen:
            continue
        allowed = sorted(alive[v])
        if n in p.param_mem:
            want = _family_spec(p, n, family)
            fixed = [k for k in allowed if p.strategies[v][k].outputs[0] == want]
            allowed = fixed or allowed
        ranked = []
        for k in allowed:
            cost = p.node_cost[n][k]
            for e in inputs.get(n, ()):
                u = rep(e.producer)
                if u in chosen:
                    cost += p.reshard_cost(e.tensor, e.out_specs[chosen[u]], e.in_specs[k])
            ranked.append(((p.act_mem[n][k] if least_memory and n in p.act_mem else 0.0), cost, k))
        ranked.sort()
        for *_, k in ranked:
            new = narrow(v, {k})
            if new is not None:
                alive.update(new)
                chosen[v] = k
                break
        else:
            return None
    return {n: chosen[rep(n)] for n in p.nodes}


def _no_reshard_kept(problem: Problem, choice: dict[Node, int]) -> bool:
    """Whether ``choice`` satisfies the no-reshard edges."""
    for e in problem.no_reshard:
        if several(e.out_specs) and several(e.in_specs) and problem.rep(e.producer) is not problem.rep(e.consumer):
            if e.out_specs[choice[e.producer]] != e.in_specs[choice[e.consumer]]:
                return False
    return True


def _fits(problem: Problem, choice: dict[Node, int]) -> bool:
    """Whether ``choice`` fits the memory bound."""
    return math.isinf(problem.memory_budget) or problem.memory_of(choice) <= problem.memory_budget


def family_plans(problem: Problem) -> list[tuple[str, dict[Node, int], float]]:
    """(family, plan, step seconds) of each family's greedy plan that keeps the no-reshard edges."""
    out = []
    for family in FAMILIES:
        choice = greedy_plan(problem, family)
        if choice is not None and _no_reshard_kept(problem, choice):
            out.append((family, choice, problem.cost_of(choice)))
    return out


def best_family(problem: Problem) -> tuple[str, dict[Node, int], float] | None:
    """(family, plan, step seconds) of the fastest family plan that fits, or None."""
    fitting = [plan for plan in family_plans(problem) if _fits(problem, plan[1])]
    return min(fitting, key=lambda plan: plan[2], default=None)


def kept_memory_floor(problem: Problem) -> float:
    """A lower bound of ``Problem.memory_of`` over every assignment: each parameter (with its
    optimizer state) and each node of each live set at its fewest bytes, each set's fixed bytes,
    resharded copies counted 0. Above the memory budget, no plan that keeps every activation fits."""
    act = problem.act_mem
    params = sum(min(problem.resident_param_bytes(p, k) for k in range(len(problem.strategies[p])))
                 for p in problem.param_mem)
    sets = problem.per_live_set(lambda v: min(act[v]), lambda item: 0.0)
    return params + (float(sets.max()) if len(sets) else 0.0)


# The solve that chooses what a start plan recomputes (recompute_start) stops at a relative gap of
# 1% (at 0, Llama-70B's did not settle in 60 s).
START_OPTIONS = {"mip_rel_gap": 0.01}


def recompute_start(prep: Prepared, *, deadline: float) -> tuple[str, dict[Node, int], list[Node], float] | None:
    """(name, plan, recomputed decisions, step seconds) of a start for the solve that chooses what
    to recompute, for a problem where no start fits keeping every activation; in the reduced
    problem's indices; None if none is found by ``deadline``. The candidates, fastest first: the
    family plans and the least-memory plan (parameters fully sharded, each class at its fewest
    output bytes, ``greedy_plan``); for each, the recomputation ILP of that plan alone (every node
    fixed to its strategy, so only what to recompute is chosen; ``START_OPTIONS``) picks the
    decisions, and the first whose memory, evaluated directly
    (``fxpar.solve.recompute.recompute_memory``), fits is the start. Its step is
    ``Problem.cost_of`` plus ``recompute_time``, the same model as the exact problem's."""
    from fxpar.solve import ilp
    from fxpar.solve.presolve import _restrict
    from fxpar.solve.recompute import analysis_of, recompute_memory, recompute_time

    reduced = prep.reduction.problem
    budget = reduced.memory_budget
    analysis_of(reduced)  # made once, shared by the fixed problems
    candidates = [(name, choice) for name, choice, _, _ in sorted(prep.starts, key=lambda t: t[2])]
    lean = greedy_plan(reduced, "fully sharded", least_memory=True)
    if lean is not None and _no_reshard_kept(reduced, lean):
        candidates.append(("least memory", lean))
    for name, choice in candidates:
        if reduced.param_memory(choice) > budget:
            continue  # recomputation does not shrink the parameters
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        fixed = _restrict(reduced, {n: [choice[n]] for n in reduced.nodes})
        try:
            sol = ilp.solve(fixed, time_limit_s=remaining, recompute=True, presolve=False, options=START_OPTIONS)
        except (ilp.Infeasible, ilp.SolverTimeout):
            continue
        if recompute_memory(reduced, choice, sol.recompute) <= budget:
            cost = reduced.cost_of(choice) + recompute_time(reduced, choice, sol.recompute)
            return f"{name}, recomputing {len(sol.recompute)} ops", choice, list(sol.recompute), cost
    return None


def merged_axes_plan(problem: Problem, time_limit_s: float) -> dict[Node, int] | None:
    """For a mesh of 3 or more axes: the optimal plan of the mesh with two adjacent axes on the same
    link merged into one (4x4x4 -> 4x16), solved first (a far smaller problem), written on the
    full mesh: a spec's placement on the merged axis is placed on both (S(d) over 16 devices is
    S(d) over 4 and again over 4, in the same rank order). None if the mesh has no such pair, the
    smaller problem has no plan in time, or a mapped strategy is not in a node's list. Building the
    smaller problem counts against ``time_limit_s``: its solve gets what is left."""
    from fxpar.cost import CostModel
    from fxpar.solve import ilp
    from fxpar.solve.problem import build_problem
    from fxpar.solve.strategies import all_strategies

    cm = problem.cost_model
    mesh = tuple(cm.mesh_shape)
    pairs = [i for i in range(len(mesh) - 1) if cm.links[i] == cm.links[i + 1]]
    if len(mesh) < 3 or not pairs or time_limit_s <= 0:
        return None
    start = clock()
    i = pairs[-1]
    merged = mesh[:i] + (mesh[i] * mesh[i + 1],) + mesh[i + 2:]
    links = tuple(cm.links[:i + 1]) + tuple(cm.links[i + 2:])
    cluster = replace(cm.cluster, links=links)
    gm = problem.nodes[0].graph.owning_module
    keys = ("fxpar_fallback", "fxpar_fallback_reason", "fxpar_rule_source")
    saved = {n: {k: n.meta[k] for k in keys if k in n.meta} for n in gm.graph.nodes}
    try:
        small = build_problem(gm, all_strategies(gm, merged), CostModel(cluster, merged),
                              simplify=bool(problem.classes or problem.no_reshard))
    finally:
        for n, meta in saved.items():
            for k in keys:
                n.meta.pop(k, None)
            n.meta.update(meta)
    small.memory_budget = problem.memory_budget
    remaining = time_limit_s - (clock() - start)
    if remaining <= 0:
        return None
    try:
        sol = ilp.solve(small, time_limit_s=remaining)
    except (ilp.Infeasible, ilp.SolverTimeout):
        return None

    def widen(spec):
        return tuple(spec[:i + 1]) + (spec[i],) + tuple(spec[i + 1:])

    choice = {}
    for n in problem.nodes:
        s = small.strategies[n][sol.choice[n]]
        want = (tuple(widen(x) for x in s.inputs), tuple(widen(x) for x in s.outputs))
        index = next((k for k, t in enumerate(problem.strategies[n]) if (t.inputs, t.outputs) == want), None)
        if index is None:
            return None
        choice[n] = index
    # Tied nodes take their class's strategy (the merged mesh's classes may differ).
    return {n: choice[problem.rep(n)] for n in problem.nodes}


@dataclass
class Prepared:
    """What every solve of one problem shares, whatever its memory rows: the presolve (which reads
    no memory budget or live set, so it is the same for the problem without a memory limit) and
    the starting plans (the families, the merged-mesh plan on 3 or more axes, and plans the caller
    adds: ``add``), each in the reduced problem's indices with its step time; whether each fits
    the memory is evaluated once, when a solve with the real budget first asks."""

    problem: Problem
    reduction: Reduction
    starts: list = field(default_factory=list)  # (name, reduced choice, step seconds, fits: bool | None)
    seconds: float = 0.0
    # A start of the recomputation solve that fits only with recomputation (``recompute_start``):
    # (name, reduced choice, recomputed decisions, step seconds with the recomputation).
    recompute_start: tuple | None = None

    def add(self, name: str, choice: dict[Node, int], cost: float, *, fits: bool | None = None) -> None:
        """A plan of the original problem (its indices) as a start of the later solves."""
        reduced = self.reduction.reduce_choice(choice)
        if reduced is not None:
            if self.reduction.lift_choice(reduced) != choice:
                cost = self.reduction.problem.cost_of(reduced)  # a dominator replaced a strategy: no slower
            self.starts.append((name, reduced, cost, fits))

    def best_start(self, *, bounded: bool) -> tuple[str, dict[Node, int], float] | None:
        """The fastest start that fits (any, if not ``bounded``)."""
        reduced = self.reduction.problem
        for i, (name, choice, cost, fits) in sorted(enumerate(self.starts), key=lambda t: t[1][2]):
            if bounded and fits is None:
                fits = _fits(reduced, choice)
                self.starts[i] = (name, choice, cost, fits)
            if not bounded or fits:
                return name, choice, cost
        return None


def prepare(problem: Problem, *, deadline: float, presolve_problem: bool = True) -> Prepared:
    """Presolve ``problem`` and build its starting plans. The presolve stops at half the time left
    before ``deadline`` (exact wherever it stops, ``presolve.presolve``); the family plans are
    made whatever the time, as the plans a time limit falls back to.

    On 3 or more mesh axes, where the full problem may be too large to solve in the time, the
    starts come first: the merged-mesh plan (with half the time), improved axis by axis
    (``axis_search.improve_by_axes``) until three quarters of the time, then the family plans; if
    there is no merged-mesh plan that fits, the fastest family plan that fits is the one improved.
    The presolve then has half of what is left. Raises ``Infeasible`` if a class has no strategy
    left. With ``presolve_problem`` False: the problem as built, with no starts (the solver
    alone)."""
    from fxpar.solve import ilp

    start = clock()
    if not presolve_problem:
        keep = {n: list(range(len(problem.strategies[n]))) for n in problem.nodes}
        return Prepared(problem, Reduction(problem, problem, keep, 0.0, {}))
    early = []  # (name, plan in the original indices, fits) made before the presolve
    if len(problem.cost_model.mesh_shape) >= 3:
        search_end = start + (deadline - start) * 3 / 4

        def improved(name: str, choice: dict[Node, int]) -> None:
            found = improve_by_axes(problem, choice, deadline=search_end, clock=clock)
            if found.moves:
                early.append((f"{name}, improved axis by axis", found.choice, True))

        merged = merged_axes_plan(problem, (deadline - start) / 2)
        if merged is not None and _no_reshard_kept(problem, merged):
            fits = _fits(problem, merged)
            early.append(("merged axes", merged, fits))
            if fits:
                improved("merged axes", merged)
        families = [(family, choice, _fits(problem, choice)) for family, choice, _ in family_plans(problem)]
        if not any(fits for _, _, fits in early):
            fitting = [(problem.cost_of(choice), name, choice) for name, choice, fits in families if fits]
            if fitting:
                _, name, choice = min(fitting, key=lambda t: t[0])
                improved(name, choice)
        early.extend(families)
    now = clock()
    reduction = presolve(problem, deadline=now + (deadline - now) / 2, clock=clock)
    if any(not ks for ks in reduction.keep.values()):
        raise ilp.Infeasible()  # a class with no strategy left: no plan satisfies the no-reshard edges
    reduced = reduction.problem
    prep = Prepared(problem, reduction)
    if not early:
        prep.starts.extend((family, choice, cost, None) for family, choice, cost in family_plans(reduced))
    for name, choice, fits in early:
        # A plan maps to one no slower and no larger (Reduction.reduce_choice).
        mapped = reduction.reduce_choice(choice)
        if mapped is not None and _no_reshard_kept(reduced, mapped):
            prep.starts.append((name, mapped, reduced.cost_of(mapped), True if fits else None))
    prep.seconds = clock() - start
    return prep


def solve_prepared(prep: Prepared, *, deadline: float, solver: str, recompute: bool, unbounded: bool = False):
    """The ILP of ``prep``'s reduced problem (with no memory limit and no live sets if
    ``unbounded``) until ``deadline``, warm-started from the fastest start that fits; never slower
    than that start (returned as is when the deadline has passed or the solver finds nothing), and
    ``SolverTimeout`` only when there is no start. The solution is in the original indices."""
    from fxpar.solve import ilp

    start = clock()
    reduced = prep.reduction.problem
    if unbounded:
        reduced = replace(reduced, memory_budget=math.inf, live_sets=[])
    best = prep.best_start(bounded=not unbounded)
    rc_start = []  # the decisions the start recomputes
    if best is None and recompute and prep.recompute_start is not None:
        name, choice, rc_start, cost = prep.recompute_start
        best = name, choice, cost
    hint = best[1] if best is not None else None
    remaining = deadline - clock()
    sol = None
    if remaining > 0:
        try:
            sol = ilp.solve(reduced, time_limit_s=remaining, solver=solver, recompute=recompute, presolve=False, hint=hint,
                            hint_recompute=rc_start)
        except ilp.SolverTimeout:
            if best is None:
                raise
    elif best is None:
        raise ilp.SolverTimeout(f"no time was left for the solver (deadline passed {-remaining:.3f} s before)")
    if sol is None:
        sol = ilp.Solution(best[1], best[2], 0.0, "feasible (time limit)", 0, 0, 0.0,
                           num_classes=len({reduced.rep(n) for n in reduced.nodes}), recompute=list(rc_start),
                           start=best[0])
    elif best is not None and sol.status != "optimal" and best[2] < sol.objective:
        sol = replace(sol, choice=best[1], objective=best[2], recompute=list(rc_start), start=best[0])
    out = lift(prep.reduction, sol)
    out.solve_seconds = clock() - start
    return out


def solve_presolved(problem: Problem, *, time_limit_s: float, solver: str, recompute: bool):
    """``fxpar.solve.ilp.solve`` on the presolved problem, warm-started from the best family plan
    (on 3 or more mesh axes, or the merged-mesh plan): presolve, starts and ILP together within
    ``time_limit_s``; the solution is in the original problem's indices."""
    start = clock()
    deadline = start + time_limit_s
    prep = prepare(problem, deadline=deadline)
    out = solve_prepared(prep, deadline=deadline, solver=solver, recompute=recompute)
    out.solve_seconds = clock() - start
    return out
