"""Axis-by-axis search: a plan of a mesh of 3 or more axes improved one mesh axis at a time.

On such a mesh a node's strategies are the products of its per-axis ones (up to 125 on 3 axes of
an op with five), and an edge's linearization has a variable per pair of its two sides' specs, so
the exact problem can be far too large to build in the time (Llama-7B on 2x4x8: 657,809
variables, more than 9 s to build). The search keeps one axis's placements of a plan fixed and
lets the others vary:

    neighbourhood(plan, a) = the plans whose every node's strategy places each of its inputs and
                             outputs on mesh axis a as the plan's strategy for that node does

This is the problem on a mesh of one axis fewer (its strategies the products over the other
axes), restricted by ``presolve._restrict`` and solved exactly by the ILP, warm-started from the
plan itself, under the problem's memory budget. Its optimum, when faster, is the next plan. Axes
are visited in turn, 0, 1, 2, 0, ...; the search stops when a full turn of axes finds nothing
faster (the plan is then the optimum of each of its neighbourhoods), or at the deadline.

Fixing two axes gives a subset of fixing either one, so the single-axis neighbourhoods are the
only ones searched. Every plan is a plan of the full problem, evaluated directly
(``Problem.cost_of``, ``Problem.memory_of``): the result is never slower than the start, and
fits where the start does. It is not proven optimal on the full mesh; the planner's exact solve
runs after it with what is left of the time, and reports the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from fxpar.solve.problem import Problem


@dataclass
class AxisSearch:
    """What ``improve_by_axes`` found: the plan, its step seconds, and the neighbourhoods it solved
    (``solves``) and how many of them gave a faster plan (``moves``)."""

    choice: dict[Node, int]
    cost: float
    solves: int = 0
    moves: int = 0
    converged: bool = False  # a full turn of axes found nothing faster


def _projections(problem: Problem, axis: int) -> dict[Node, list[tuple]]:
    """Per node, each strategy's placements on ``axis`` (its inputs', then its outputs')."""
    out: dict[Node, list[tuple]] = {}
    by_list: dict[int, list[tuple]] = {}
    for n in problem.nodes:
        strategies = problem.strategies[n]
        key = id(strategies)
        if key not in by_list:
            by_list[key] = [(tuple(spec[axis] for spec in s.inputs), tuple(spec[axis] for spec in s.outputs))
                            for s in strategies]
        out[n] = by_list[key]
    return out


def neighbourhood(problem: Problem, choice: dict[Node, int], axis: int) -> dict[Node, list[int]]:
    """Per node, the indices of its strategies that place every input and output on ``axis`` as
    its strategy in ``choice`` does (the chosen one among them)."""
    proj = _projections(problem, axis)
    keep: dict[Node, list[int]] = {}
    memo: dict[tuple[int, int], list[int]] = {}
    for n in problem.nodes:
        key = (id(problem.strategies[n]), choice[n])
        if key not in memo:
            want = proj[n][choice[n]]
            memo[key] = [k for k, p in enumerate(proj[n]) if p == want]
        keep[n] = memo[key]
    return keep


def improve_by_axes(problem: Problem, choice: dict[Node, int], *, deadline: float, clock) -> AxisSearch:
    """``choice`` (a plan of ``problem`` that fits its memory budget) improved by the search of the
    module's docstring until it converges or ``clock()`` passes ``deadline``."""
    from fxpar.solve import ilp
    from fxpar.solve.presolve import _restrict
    from fxpar.solve.warmstart import _fits

    num_axes = len(problem.cost_model.mesh_shape)
    found = AxisSearch(dict(choice), problem.cost_of(choice))
    unimproved = 0
    axis = 0
    while unimproved < num_axes:
        remaining = deadline - clock()
        if remaining <= 0:
            return found
        keep = neighbourhood(problem, found.choice, axis)
        sub = _restrict(problem, keep)
        hint = {n: keep[n].index(k) for n, k in found.choice.items()}
        try:
            sol = ilp.solve(sub, time_limit_s=remaining, presolve=False, hint=hint)
        except (ilp.SolverTimeout, ilp.Infeasible):
            return found
        found.solves += 1
        new = {n: keep[n][k] for n, k in sol.choice.items()}
        cost = problem.cost_of(new)
        if _fits(problem, new) and cost < found.cost * (1 - 1e-9):
            found.choice, found.cost = new, cost
            found.moves += 1
        if sol.status != "optimal":
            return found  # stopped at the deadline
        # Proven: the plan is the optimum of this neighbourhood; a turn of the other axes is left.
        unimproved = 1 if found.choice is new else unimproved + 1
        axis = (axis + 1) % num_axes
    found.converged = True
    return found
