"""Exact reductions of a ``Problem`` before the ILP: the reduced problem has the same optimum.

A class (``Problem.classes``: repeated layers share one decision) keeps a subset of its strategies;
``Reduction.lift`` maps a solution of the reduced problem back to indices of the original lists.
Three reductions run to a fixed point:

* **Forced strategies.** Strategies that ``Problem.forced`` excludes are removed.
* **Infeasible strategies.** On an edge the simplified problem keeps free of resharding
  (``Problem.no_reshard``, both sides offering several specs), the consumer's wanted spec must be
  one the producer gives, and the producer must give one the consumer can take: a strategy of
  either side whose spec the other side has no strategy for is in no feasible plan.
* **Dominated strategies.** Strategy s of a class is removed when another kept strategy t of it
  makes the same choice wherever the choice interacts with another class (the same spec on every
  edge whose other side still offers several specs and whose resharding is not free, and on every
  no-reshard edge) and costs no more in any term: compute of every member, resharding of every
  other edge (critical-path communication, overlappable gradient sync and the last gradients'
  sync each on its own), parameter memory and resharded parameter copies, activation bytes of
  every member. Equal vectors keep the first. Each term of the objective and of every memory
  row (with recomputation too) is a sum of such terms with non-negative weights, except the
  overlap window z >= G - e B, where backward compute enters with -e; since e <= 1 and a backward
  node's compute also enters the step with +1, lowering it by d raises the exposed sync by at
  most e d <= d. So for every assignment of the other classes t's plan is no slower and no
  larger than s's: the optimum is unchanged, and so is the least memory (``ilp.min_memory``).

Removing strategies can leave an edge's side with one spec, which turns its cost into a term of the
other side and lets more strategies be compared; hence the fixed point.

Each removal is exact given the strategies still kept when it is made, so the reductions may stop
after any class (``deadline``): the problem reduced so far has the same optimum, only a larger
search space (``Reduction.complete`` is then False).

A plan of the original problem maps to one of the reduced problem that is no slower and no larger
(``Reduction.reduce_choice``): each dominated strategy is replaced by the one that dominated it
(following the chain to a kept one). Replacing them in the order they were removed, each step
keeps the plan inside the problem as it was at that removal, where the domination holds; a plan
that keeps the no-reshard edges never uses a strategy removed as infeasible (no such plan does),
and the replacements keep the same specs on those edges.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

from torch.fx import Node

from fxpar.cost import spec_bytes
from fxpar.solve.problem import Edge, Problem, several

_MAX_ROUNDS = 20


@dataclass
class Reduction:
    original: Problem
    problem: Problem  # the reduced problem
    keep: dict[Node, list[int]]  # per node: the original indices of its kept strategies
    seconds: float
    removed: dict[str, int]  # strategies removed by each reduction
    # (class, removed strategy) -> the strategy that dominated it, original indices
    dominated_by: dict[tuple[Node, int], int] = field(default_factory=dict)
    complete: bool = True  # False: stopped at the deadline before the fixed point

    @property
    def num_strategies(self) -> tuple[int, int]:
        """(before, after), summed over classes."""
        reps = {self.original.rep(n) for n in self.original.nodes}
        return sum(len(self.original.strategies[v]) for v in reps), sum(len(self.keep[v]) for v in reps)

    def lift_choice(self, choice: dict[Node, int]) -> dict[Node, int]:
        return {n: self.keep[n][k] for n, k in choice.items()}

    def reduce_choice(self, choice: dict[Node, int]) -> dict[Node, int] | None:
        """A choice of the original problem in the reduced problem's indices, each dominated
        strategy replaced by its dominator (no slower and no larger, see the module's docstring);
        None if it uses a strategy removed as forced out or infeasible."""
        canon = self.problem.classes
        out = {}
        for n, k in choice.items():
            v = canon.get(n, n)
            while (v, k) in self.dominated_by:
                k = self.dominated_by[(v, k)]
            try:
                out[n] = self.keep[n].index(k)
            except ValueError:
                return None
        return out


def _overlap_parts(p: Problem, e: Edge, a, b, cost: float) -> tuple[float, float, float]:
    """(critical-path, overlappable, last-gradient) seconds of resharding edge ``e`` from a to b."""
    if p.overlappable(e, a, b):
        return 0.0, cost, cost if e in p.last_grads else 0.0
    return cost, 0.0, 0.0


def presolve(problem: Problem, *, deadline: float = math.inf, clock=time.perf_counter) -> Reduction:
    """The reduced problem (see the module's docstring), stopping after the class at which
    ``clock()`` passes ``deadline``."""
    start = clock()
    p = problem
    canon = _canonical_classes(p)
    rep = lambda n: canon.get(n, n)  # noqa: E731
    reps = list(dict.fromkeys(rep(n) for n in p.nodes))
    members: dict[Node, list[Node]] = defaultdict(list)
    for n in p.nodes:
        members[rep(n)].append(n)
    alive: dict[Node, list[int]] = {v: list(range(len(p.strategies[v]))) for v in reps}
    removed = {"forced": 0, "infeasible": 0, "dominated": 0}
    dominated_by: dict[tuple[Node, int], int] = {}
    stopped = [False]
    for v, allowed in p.forced.items():
        r = rep(v)
        left = [k for k in alive[r] if k in allowed]
        removed["forced"] += len(alive[r]) - len(left)
        alive[r] = left
    incident: dict[Node, list[Edge]] = defaultdict(list)
    for e in p.edges:
        u, w = rep(e.producer), rep(e.consumer)
        incident[u].append(e)
        if w is not u:
            incident[w].append(e)
    # Edges the ILP keeps free of resharding (constraints, no edge variables): both sides offered
    # several specs in the original problem and the edge joins two classes.
    constrained = [
        e for e in p.edges
        if e in p.no_reshard and rep(e.producer) is not rep(e.consumer)
        and several(e.out_specs) and several(e.in_specs)
    ]
    constrained_set = set(constrained)
    # propagate reads an edge's classes and spec lists only: the edges of repeated layers (the same
    # classes, argument and specs) are propagated once.
    distinct: dict[tuple, list[Edge]] = defaultdict(list)
    for e in constrained:
        same = distinct[(rep(e.producer), rep(e.consumer), e.out_index, e.position)]
        if not any(f.out_specs == e.out_specs and f.in_specs == e.in_specs for f in same):
            same.append(e)
    propagated = [e for same in distinct.values() for e in same]
    mesh = p.cost_model.mesh_shape

    def side_specs(e: Edge, v: Node) -> list:
        """The spec v's strategies give (v the producer) or want (v the consumer) on e."""
        return e.out_specs if rep(e.producer) is v else e.in_specs

    def propagate() -> bool:
        changed = False
        again = True
        while again:
            again = False
            for e in propagated:
                u, w = rep(e.producer), rep(e.consumer)
                given = {e.out_specs[k] for k in alive[u]}
                wanted = {e.in_specs[k] for k in alive[w]}
                left_w = [k for k in alive[w] if e.in_specs[k] in given]
                left_u = [k for k in alive[u] if e.out_specs[k] in wanted]
                if len(left_w) < len(alive[w]) or len(left_u) < len(alive[u]):
                    removed["infeasible"] += len(alive[w]) - len(left_w) + len(alive[u]) - len(left_u)
                    alive[w], alive[u] = left_w, left_u
                    again = changed = True
        return changed

    def classify(v: Node) -> tuple[list[tuple], list[tuple]]:
        """v's incident edges that key its strategies (the other side offers several specs and the
        edge is not free) and those whose cost is a term of v alone: (edge, v produces, the other
        side's one spec or None inside the class)."""
        keyed, unary = [], []
        for e in incident[v]:
            u, w = rep(e.producer), rep(e.consumer)
            if u is w:
                unary.append((e, True, None))
                continue
            produces = u is v
            other = w if produces else u
            other_side = e.in_specs if produces else e.out_specs
            other_specs = {other_side[k] for k in alive[other]}
            if len(other_specs) == 1:
                unary.append((e, produces, next(iter(other_specs))))
                continue
            if e not in constrained_set and e.producer not in p.param_mem:
                mine = e.out_specs if produces else e.in_specs
                mine_specs = {mine[k] for k in alive[v]}
                if not any(p.reshard_cost(e.tensor, *((a, o) if produces else (o, a)))
                           for a in mine_specs for o in other_specs):
                    continue  # free whatever both sides choose
            keyed.append((e, produces, None))
        return keyed, unary

    def vector(v: Node, k: int, unary: list[tuple]) -> list[float]:
        """Strategy k's cost terms (see the module's docstring)."""
        vec: list[float] = []
        for n in members[v]:
            vec.append(p.node_cost[n][k])
            if n in p.param_mem:
                vec.append(p.param_mem[n][k])
            if n in p.act_mem:
                vec.append(p.act_mem[n][k])
        for e, produces, o in unary:
            if o is None:
                a, b = e.out_specs[k], e.in_specs[k]
            elif produces:
                a, b = e.out_specs[k], o
            else:
                a, b = o, e.in_specs[k]
            vec.extend(_overlap_parts(p, e, a, b, p.reshard_cost(e.tensor, a, b)))
            if e.producer in p.param_mem:
                vec.append(spec_bytes(e.tensor, b, mesh) if a != b else 0.0)
        return vec

    def dominate(todo: set[Node]) -> set[Node]:
        """Removes dominated strategies of the classes in ``todo``; returns the classes changed."""
        changed = set()
        for v in reps:
            if v not in todo or len(alive[v]) < 2:
                continue
            if clock() >= deadline:
                stopped[0] = True
                break
            keyed, unary = classify(v)
            groups: dict[tuple, list[int]] = defaultdict(list)
            for k in alive[v]:
                groups[tuple((e.out_specs if produces else e.in_specs)[k] for e, produces, _ in keyed)].append(k)
            gone = set()
            for ks in groups.values():
                if len(ks) < 2:
                    continue
                vec = {k: vector(v, k, unary) for k in ks}
                for i, s_ in enumerate(ks):
                    vs = vec[s_]
                    for j, t in enumerate(ks):
                        if t == s_ or t in gone:
                            continue
                        vt = vec[t]
                        if all(x <= y for x, y in zip(vt, vs)) and (vt != vs or j < i):
                            gone.add(s_)
                            dominated_by[(v, s_)] = t
                            break
            if gone:
                alive[v] = [k for k in alive[v] if k not in gone]
                removed["dominated"] += len(gone)
                changed.add(v)
        return changed

    neighbours: dict[Node, set[Node]] = defaultdict(set)
    for e in p.edges:
        u, w = rep(e.producer), rep(e.consumer)
        neighbours[u].add(w)
        neighbours[w].add(u)
    todo = set(reps)
    for _ in range(_MAX_ROUNDS):
        before = {v: len(alive[v]) for v in reps}
        propagate()
        todo |= {v for v in reps if len(alive[v]) != before[v]}
        changed = dominate(todo)
        # A class whose strategies changed can make its neighbours' edges unary or free.
        touched = changed | {v for v in reps if len(alive[v]) != before[v]}
        if not touched or stopped[0]:
            break
        if clock() >= deadline:
            stopped[0] = True
            break
        todo = set().union(*(neighbours[v] for v in touched)) | touched
    reduced = _restrict(p, {n: alive[rep(n)] for n in p.nodes})
    reduced.classes = canon
    keep = {n: alive[rep(n)] for n in p.nodes}
    return Reduction(p, reduced, keep, clock() - start, removed, dominated_by, complete=not stopped[0])


def _canonical_classes(p: Problem) -> dict[Node, Node]:
    """``p.classes`` with the same partition of the nodes, keyed by a member of each class: the ILP
    ties the nodes n with one ``p.rep(n)``, and a key that is itself tied into another class
    (``repeat.repeated_classes`` can chain) is replaced by its class's first member."""
    groups: dict[Node, list[Node]] = defaultdict(list)
    for n in p.nodes:
        groups[p.rep(n)].append(n)
    out: dict[Node, Node] = {}
    for key, nodes in groups.items():
        head = key if key in nodes else nodes[0]
        for n in nodes:
            if n is not head:
                out[n] = head
    return out


def _restrict(p: Problem, keep: dict[Node, list[int]]) -> Problem:
    """``p`` with only the strategies ``keep`` names (per node, in order)."""
    lists: dict[tuple, list] = {}

    def sub(values: list, node: Node) -> list:
        return [values[k] for k in keep[node]]

    strategies = {}
    for n in p.nodes:
        key = (id(p.strategies[n]), tuple(keep[n]))
        if key not in lists:
            lists[key] = sub(p.strategies[n], n)
        strategies[n] = lists[key]  # class members share one list, as repeated_classes requires
    edge_map: dict[Edge, Edge] = {}
    for e in p.edges:
        # dataclasses.replace, without its per-call field checks (20,000 edges on a 32-layer model)
        f = edge_map[e] = object.__new__(Edge)
        f.__dict__.update(e.__dict__)
        f.out_specs, f.in_specs = sub(e.out_specs, e.producer), sub(e.in_specs, e.consumer)
    out = replace(
        p,
        strategies=strategies,
        node_cost={n: sub(c, n) for n, c in p.node_cost.items()},
        edges=[edge_map[e] for e in p.edges],
        param_mem={n: sub(m, n) for n, m in p.param_mem.items()},
        act_mem={n: sub(m, n) for n, m in p.act_mem.items()},
        forced={},
        no_reshard={edge_map[e] for e in p.no_reshard},
        last_grads={edge_map[e] for e in p.last_grads},
    )
    # Same tensors and specs: the reshard-cost caches stay valid (shared, not copied).
    out._reshard_cache = p._reshard_cache
    out._matrix_cache = p._matrix_cache
    out._edge_terms_cache, out._copy_size_cache = {}, {}  # keyed by edge: these are new
    out.recompute_analysis = p.recompute_analysis
    return out


def lift(reduction: Reduction, solution):
    """A ``Solution`` of ``reduction.problem`` as one of the original problem (indices mapped back;
    the objective recomputed on the original problem)."""
    from fxpar.solve.recompute import recompute_time

    choice = reduction.lift_choice(solution.choice)
    objective = reduction.original.cost_of(choice)
    if solution.recompute:
        objective += recompute_time(reduction.original, choice, solution.recompute)
    return replace(solution, choice=choice, objective=objective)
