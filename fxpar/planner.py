"""``fxpar.plan``: capture, annotate, enumerate strategies, solve; no process group needed."""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from fxpar.cluster import Cluster, describe_value, preset
from fxpar.cost import CostModel
from fxpar.errors import (
    CaptureError,
    ClusterSpecError,
    FallbackWarning,
    InfeasiblePlanError,
    PlanOptionError,
    PlanTimeoutError,
)
from fxpar.passes.annotate import annotate
from fxpar.passes.capture import capture
from fxpar.placement import spec_str
from fxpar.plan import Plan, fmt_bytes, layer_rows
from fxpar.progress import stage
from fxpar.solve import warmstart
from fxpar.solve.ilp import DEFAULT_SOLVER, Infeasible, SolverTimeout, memory_of, min_memory, min_memory_found, solve
from fxpar.solve.recompute import recompute_split
from fxpar.solve.problem import OPTIMIZER_STATE_FACTOR, Problem, build_problem
from fxpar.runtime.steps import BATCH_NORM_STATS
from fxpar.solve.strategies import INPUT_PLACEMENTS, all_strategies, graph_batch_norm, graph_input_placement, node_strategies

# Seconds the InfeasiblePlanError's explanation may spend finding the least memory with
# recomputation; where it stops first, the message gives the least found as an upper bound.
EXPLAIN_LIMIT_S = 30.0


def resolve_mesh(cluster: Cluster | None, mesh_shape: Sequence[int] | None) -> tuple[Cluster, tuple[int, ...]]:
    if cluster is not None and not isinstance(cluster, Cluster):
        raise PlanOptionError(
            f"cluster is {describe_value(cluster)}; give a fxpar.Cluster, e.g. fxpar.preset('a100-nvlink-8') "
            "or fxpar.Cluster.load('profile.json')"
        )
    if mesh_shape is None:
        if cluster is None:
            raise PlanOptionError("give a cluster, a mesh_shape, or both (e.g. mesh_shape=(2,))")
        mesh_shape = (cluster.num_devices,)
    if isinstance(mesh_shape, (str, bytes)) or not isinstance(mesh_shape, Sequence):
        raise PlanOptionError(
            f"mesh_shape is {describe_value(mesh_shape)}; give a tuple of axis sizes, e.g. mesh_shape=(2,) for "
            "2 devices or (2, 4) for 2 nodes of 4"
        )
    for axis, size in enumerate(mesh_shape):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise PlanOptionError(
                f"mesh_shape {list(mesh_shape)}: axis {axis} has size {describe_value(size)}; every size must be "
                "a whole number >= 1, e.g. mesh_shape=(2, 4)"
            )
    if not mesh_shape:
        raise PlanOptionError("mesh_shape is empty; give at least one axis size, e.g. mesh_shape=(2,)")
    mesh = tuple(int(s) for s in mesh_shape)
    if cluster is None:
        cluster = preset("cpu-local", num_devices=math.prod(mesh))
    if math.prod(mesh) > cluster.num_devices:
        raise ClusterSpecError(
            f"mesh {list(mesh)} needs {math.prod(mesh)} devices but cluster {cluster.name!r} has "
            f"{cluster.num_devices}; use a smaller mesh or a larger cluster"
        )
    cluster.link(0, len(mesh))  # validates the number of link levels
    return cluster, mesh


def capture_and_annotate(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], *, grad: bool = True, autocast_dtype: torch.dtype | None = None,
    input_placement: str = "shard", batch_norm: str = "global",
) -> GraphModule:
    """``capture`` (see there for ``grad`` and ``autocast_dtype``) then ``annotate``, with a
    ``CaptureError`` naming the user's line for data-dependent control flow. ``input_placement``
    (``check_input_placement``) is recorded as ``gm.meta["fxpar_input_placement"]``, which the
    inputs' strategies read; ``batch_norm`` (``check_batch_norm``) as ``gm.meta["fxpar_batch_norm"]``,
    which the cost model reads (statistics of the whole batch cost collectives, a device's own none)."""
    check_input_placement(input_placement)
    check_batch_norm(batch_norm)
    try:
        gm = capture(model, example_inputs, grad=grad, autocast_dtype=autocast_dtype)
    except (DataDependentOutputException, GuardOnDataDependentSymNode, DynamicOutputShapeException) as exc:
        raise _data_dependent_error(model, exc) from exc
    gm = annotate(gm)
    gm.meta["fxpar_input_placement"] = input_placement
    gm.meta["fxpar_batch_norm"] = batch_norm
    return gm


def check_batch_norm(batch_norm: object) -> None:
    """``batch_norm`` must be one of ``BATCH_NORM_STATS``: "global" (a batch norm over a cut batch
    uses the whole batch's statistics, as on one device) or "local" (each device's own, as DDP)."""
    if batch_norm not in BATCH_NORM_STATS:
        raise PlanOptionError(
            f"batch_norm={batch_norm!r} is not one of {list(BATCH_NORM_STATS)}: 'global' (the whole batch's statistics, "
            "as on one device) or 'local' (each device's own, as DDP)"
        )


def check_input_placement(input_placement: object) -> None:
    """``input_placement`` must be one of ``INPUT_PLACEMENTS``: "shard" (each rank is given its
    slice of the global batch along dim 0, in rank order, as with DDP) or "replicate" (every rank
    is given the whole global batch, as torch's tensor parallelism feeds its ranks)."""
    if input_placement not in INPUT_PLACEMENTS:
        raise PlanOptionError(
            f"input_placement={input_placement!r} is not one of {list(INPUT_PLACEMENTS)}: 'shard' (each rank "
            "passes its slice of the global batch, as with DDP) or 'replicate' (every rank passes the whole batch)"
        )


def _data_dependent_error(model: nn.Module, exc: Exception) -> CaptureError:
    """A CaptureError for a forward whose Python control flow or shapes depend on tensor values,
    naming the line of the user's code where the traceback shows it."""
    line = _user_line(model, exc.__traceback__)
    where = f" at {line}" if line else ""
    if isinstance(exc, DynamicOutputShapeException):
        return CaptureError(
            f"the forward of {type(model).__name__} calls an op whose output shape depends on tensor values{where} "
            f"({exc}); fxpar plans for static shapes: use a fixed-shape form (torch.where(mask, x, 0) instead of "
            "x[mask], a padded index instead of torch.nonzero), or move it out of forward"
        )
    return CaptureError(
        f"the forward of {type(model).__name__} branches on a tensor's value{where}: fxpar records the step on "
        "fake tensors, which have no values, so `if`, `while`, .item() or bool() of a tensor cannot be traced; "
        "compute both sides and pick with torch.where(cond, a, b) (or use torch.cond), or move the decision "
        "out of forward"
    )


def _user_line(model: nn.Module, tb) -> str:
    """``file:line (source)`` of the innermost traceback frame in a file that defines one of the
    model's modules (torch's own modules excepted); empty if there is none."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    files = set()
    for m in model.modules():
        try:
            source_file = inspect.getsourcefile(type(m))
        except (TypeError, OSError):
            continue
        if source_file:
            files.add(os.path.abspath(source_file))
    found = ""
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if path in files and not path.startswith(torch_dir):
            source = linecache.getline(path, tb.tb_lineno).strip()
            found = f"{path}:{tb.tb_lineno}" + (f" (`{source}`)" if source else "")
        tb = tb.tb_next
    return found


def _apply_force(problem: Problem, force: dict[str, str]) -> None:
    by_name = {n.name: n for n in problem.nodes}
    by_fqn = {n.meta.get("fxpar_fqn"): n for n in problem.nodes if n.op == "placeholder"}
    for key, want in force.items():
        node = by_name.get(key) or by_fqn.get(key)
        if node is None:
            raise PlanOptionError(f"force names {key!r}, which is neither a node nor a parameter of the graph")
        allowed = {
            k for k, s in enumerate(problem.strategies[node]) if want in (s.label(), spec_str(s.outputs[0]))
        }
        if not allowed:
            options = sorted({s.label() for s in problem.strategies[node]})
            raise PlanOptionError(f"force[{key!r}] = {want!r} is not a strategy of %{node.name}; it has {options}")
        problem.forced[node] = allowed


def check_options(*, optimizer: str, force: Mapping[str, str] | None, time_limit_s: float) -> None:
    """Raise ``PlanOptionError`` for an ``optimizer``, ``force`` or ``time_limit_s`` of the wrong type or range."""
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZER_STATE_FACTOR:
        raise PlanOptionError(
            f"unknown optimizer {optimizer!r}; known: {sorted(OPTIMIZER_STATE_FACTOR)} (give the name of the torch "
            "optimizer you train with, e.g. optimizer='adamw' for torch.optim.AdamW)"
        )
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, numbers.Real) or not 0 < time_limit_s < math.inf:
        raise PlanOptionError(
            f"time_limit_s is {describe_value(time_limit_s)}; give the solver's limit in seconds, a finite number "
            "> 0 (e.g. time_limit_s=60)"
        )
    if force is None:
        return
    if not isinstance(force, Mapping):
        raise PlanOptionError(
            f"force is {describe_value(force)}; give a dict from parameter or node name to a strategy, e.g. "
            "force={'layers.1.weight': 'S(1)'}"
        )
    for key, want in force.items():
        if not isinstance(key, str) or not isinstance(want, str):
            raise PlanOptionError(
                f"force has the entry {key!r}: {want!r}; keys and values must be strings, e.g. "
                "force={'layers.1.weight': 'S(1)'}"
            )


def _check_force(gm: GraphModule, force: Mapping[str, str], mesh: tuple[int, ...]) -> None:
    by_name = {n.name: n for n in gm.graph.nodes if n.op in ("placeholder", "call_function")}
    by_fqn = {n.meta.get("fxpar_fqn"): n for n in gm.graph.nodes if n.op == "placeholder"}
    for key, want in force.items():
        node = by_name.get(key) or by_fqn.get(key)
        if node is None:
            params = sorted(n.meta["fxpar_fqn"] for n in gm.graph.nodes if n.meta.get("fxpar_role") == "param")
            raise PlanOptionError(
                f"force names {key!r}, which is neither a node nor a parameter of the graph; parameters: {params[:8]}"
                + (" ..." if len(params) > 8 else "")
            )
        options = node_strategies(node, mesh)
        if not any(want in (s.label(), spec_str(s.outputs[0])) for s in options):
            labels = sorted({s.label() for s in options})
            raise PlanOptionError(f"force[{key!r}] = {want!r} is not a strategy of %{node.name}; it has {labels}")


def solve_with_recompute(problem: Problem, *, time_limit_s: float, recompute: bool, solver: str = DEFAULT_SOLVER,
                         presolve: bool = True):
    """The best plan keeping every activation and, with ``recompute`` where memory can bind, the
    best with the ILP also choosing what to recompute; the second only if it is faster (so a plan
    that fits without recomputation is never replaced by one as fast). Infeasible if neither fits.
    The optimum without a memory limit is solved first: if it is proven and fits, it is the answer
    to both (``_unbounded_optimum``); a plan of that solve that fits but is not proven optimal is
    kept in case the solve that keeps every activation finds none in its time.

    ``time_limit_s`` is one budget for all of it: the presolve and the starting plans (the
    merged-mesh plan on 3-D meshes) are computed once (``warmstart.prepare``) and shared by the
    solves, and each solve runs to a deadline inside the budget: the one without a memory limit
    to a third of the time left after the preparation, the one keeping every activation to two
    thirds of what is then left when a recomputation solve follows (else to the end), the
    recomputation solve to the end, each deadline less the most a solve so far ran past its own.
    Each plan found fits and is handed on as a start of the next solve, so a solve stopped at its
    deadline returns a plan no slower than the starts.

    Where no plan keeping every activation can fit (``warmstart.kept_memory_floor``: every value
    at its fewest bytes is over the budget), the first two solves are skipped. Where the
    recomputation solve has no start that fits, one is made first (``warmstart.recompute_start``:
    a family or least-memory plan with the recomputation that ILP chooses for it alone, in at most
    two thirds of the time left), so that a time limit returns that plan rather than none."""
    start = warmstart.clock()
    deadline = start + time_limit_s
    # Infeasible here (no class left with a strategy) is final.
    prep = warmstart.prepare(problem, deadline=deadline, presolve_problem=presolve)
    reduced = prep.reduction.problem
    free = kept = None
    bound, late = 0.0, 0.0
    if warmstart.kept_memory_floor(reduced) > reduced.memory_budget:
        # Even at its fewest bytes per value no plan keeping every activation fits: the solves
        # without a memory limit and keeping every activation cannot give a plan.
        if not recompute:
            raise Infeasible()
    else:
        now = warmstart.clock()
        free_deadline = now + (deadline - now) / 3
        free, bound = _unbounded_optimum(prep, deadline=free_deadline, solver=solver)
        if free is not None and free.status == "optimal":
            return free
        if free is not None:
            prep.add("no memory limit", free.choice, free.objective, fits=True)
        # A solve may end after its deadline (HiGHS stops at its next check, the solution is read
        # back): the most it did so far is taken off the deadlines of the solves that follow.
        now = warmstart.clock()
        late = max(0.0, now - free_deadline)
        end = deadline - late
        kept_deadline = now + (end - now) * 2 / 3 if recompute else end
        try:
            kept = warmstart.solve_prepared(prep, deadline=kept_deadline, solver=solver, recompute=False)
        except Infeasible:
            kept = None
        except SolverTimeout:
            if free is None and not recompute:
                raise
            kept = None
        late = max(late, warmstart.clock() - kept_deadline)
        if free is not None and (kept is None or free.objective < kept.objective):
            kept = free
    # The optimum without a memory limit does not fit (or was not proven in time): memory may bind.
    # The recomputation solve is skipped, given a plan, when less time is left than the most a
    # solve has run late: building its (larger) model alone would take longer.
    if recompute and (kept is None or deadline - late - warmstart.clock() > late):
        if kept is not None:
            prep.add("kept activations", kept.choice, kept.objective, fits=True)
        elif presolve and prep.best_start(bounded=True) is None:
            # No start fits keeping every activation: one that fits with recomputation, found in
            # at most two thirds of the time left, so that a time limit still returns a plan.
            now = warmstart.clock()
            prep.recompute_start = warmstart.recompute_start(prep, deadline=now + (deadline - late - now) * 2 / 3)
        try:
            sol = warmstart.solve_prepared(prep, deadline=deadline - late, solver=solver, recompute=True)
        except (Infeasible, SolverTimeout):
            if kept is None:
                raise
            sol = None
        if sol is not None and sol.recompute and (kept is None or sol.objective < kept.objective * (1 - 1e-9)):
            sol.solve_seconds = warmstart.clock() - start
            return _bounded(sol, bound)
    if kept is None:
        raise Infeasible()
    return _bounded(kept, bound)


def _bounded(sol, bound: float):
    """``sol`` with the bound of the solve without a memory limit where it is higher: that problem
    relaxes the others (no memory rows; recomputation only adds time), so it bounds them too."""
    if sol.status == "optimal" or bound <= sol.bound:
        return sol
    return dataclasses.replace(sol, bound=min(bound, sol.objective))


def _unbounded_optimum(prep: warmstart.Prepared, *, deadline: float, solver: str):
    """(plan, bound): the best plan of the prepared problem with no memory limit that the solver
    finds by ``deadline`` if it fits the real limit, else None; and the solver's bound on it. Recomputation only adds time, so when it is
    proven optimal no plan that recomputes is faster: the solve that chooses what to recompute, the
    slowest of the planner's, is then not needed, nor the lazy memory rows of the solve that keeps
    every activation (for which it is the optimum too). The problem is solved with an infinite
    budget and no live sets, so neither the ILP nor the choice of its start evaluates memory; the
    plan found is then checked against the real budget once."""
    try:
        sol = warmstart.solve_prepared(prep, deadline=deadline, solver=solver, recompute=False, unbounded=True)
    except SolverTimeout:
        return None, 0.0
    problem = prep.problem
    budget = problem.memory_budget
    if problem.memory_of(sol.choice) > budget + 1e-6 * max(1.0, budget):
        return None, sol.bound
    return sol, sol.bound


def plan_graph(
    gm: GraphModule,
    *,
    cluster: Cluster | None = None,
    mesh_shape: Sequence[int] | None = None,
    optimizer: str = "adam",
    force: dict[str, str] | None = None,
    time_limit_s: float = 60.0,
    strict: bool = False,
    simplify: bool = True,
    recompute: bool = True,
) -> tuple[Plan, Problem]:
    check_options(optimizer=optimizer, force=force, time_limit_s=time_limit_s)
    cluster, mesh = resolve_mesh(cluster, mesh_shape)
    if force:
        _check_force(gm, force, mesh)
    cost_model = CostModel(cluster, mesh)
    start = time.perf_counter()
    with stage(f"building the ILP for {len(gm.graph.nodes)} nodes on mesh {list(mesh)}"):
        strategies = all_strategies(gm, mesh, strict=strict)
        problem = build_problem(gm, strategies, cost_model, optimizer=optimizer, simplify=simplify)
    problem.build_seconds = time.perf_counter() - start
    if force:
        _apply_force(problem, force)
    simplified = problem
    solve_start = warmstart.clock()
    try:
        try:
            with stage(f"solving ({len(problem.nodes)} nodes)", limit_s=time_limit_s):
                sol = solve_with_recompute(problem, time_limit_s=time_limit_s, recompute=recompute)
        except Infeasible:
            if not simplify:
                raise
            # The simplifications restrict the search space; the full problem may still fit.
            problem = build_problem(gm, strategies, cost_model, optimizer=optimizer, simplify=False)
            problem.build_seconds = time.perf_counter() - start
            if force:
                _apply_force(problem, force)
            # Recomputation is chosen on the simplified problem only (the full one is far larger).
            # What is left of the budget (none left: the best start, if any, is the plan).
            sol = solve(problem, time_limit_s=time_limit_s - (warmstart.clock() - solve_start))
    except Infeasible:
        need = min_memory(problem)
        need_recompute, proven = min_memory_found(simplified, recompute=True, time_limit_s=EXPLAIN_LIMIT_S)
        # nan: the solver found no assignment in its time; unproven: the least found, an upper bound.
        if need_recompute != need_recompute:
            with_recompute = "an amount not found in time"
        else:
            with_recompute = fmt_bytes(need_recompute) if proven else f"at most {fmt_bytes(need_recompute)} (the least found in {EXPLAIN_LIMIT_S:g} s)"
        raise InfeasiblePlanError(
            f"no plan fits: on mesh {list(mesh)} the smallest plan needs {fmt_bytes(need)} per device "
            f"(parameters, gradients, {optimizer} state and live activations), {with_recompute} with "
            f"activations recomputed{'' if recompute else ' (recompute=True)'}, but {cluster.device.name} has "
            f"{fmt_bytes(cluster.device.memory_bytes)}; use more devices, a smaller batch or model, "
            "or a cluster with more memory"
        ) from None
    except SolverTimeout as exc:
        raise PlanTimeoutError(
            f"{exc} for {len(problem.nodes)} nodes on mesh {list(mesh)}; raise time_limit_s (now {time_limit_s})"
        ) from None
    if sol.status != "optimal":
        # The solver's bound where it has one, else (higher) the floor of every plan's cost.
        floor = problem.cost_floor()
        if floor > sol.bound:
            sol = dataclasses.replace(sol, bound=min(floor, sol.objective))
    assignment = {n: problem.strategies[n][k] for n, k in sol.choice.items()}
    parts = problem.breakdown(sol.choice)
    update = sum(problem.update_cost[n][k] for n, k in sol.choice.items() if n in problem.update_cost)
    handoff = cost_model.gradient_handoff_time() * len(problem.update_cost)
    compute = update + handoff + sum(cost_model.compute_time(n, problem.strategies[n][k]) for n, k in sol.choice.items())
    recompute_s = recompute_split(problem, sol.choice, sol.recompute) if sol.recompute else (0.0, 0.0)
    compute += recompute_s[0]
    params = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta["fxpar_role"] == "param"]
    plan = Plan(
        mesh_shape=mesh,
        cluster=cluster,
        strategies={n.name: s for n, s in assignment.items()},
        predicted_step_s=sol.objective,
        compute_s=compute,
        comm_s=sol.objective - compute,
        memory_bytes=memory_of(problem, sol.choice, sol.recompute if sol.recompute else None),
        param_specs={p.meta["fxpar_fqn"]: assignment[p].outputs[0] for p in params},
        optimizer=optimizer,
        input_placement=graph_input_placement(gm.graph),
        batch_norm=graph_batch_norm(gm.graph),
        solver={
            "status": sol.status,
            # A relative gap under 1e-12 is the rounding of the solver's bound and objective sums.
            "gap": sol.gap if sol.gap > 1e-12 else 0.0,
            "num_variables": sol.num_variables,
            "num_constraints": sol.num_constraints,
            "num_nodes": len(problem.nodes),
            "num_classes": sol.num_classes,
            "num_memory_sets": sol.num_memory_sets,
            "num_live_sets": len(problem.live_sets),
            "optimizer_s": update,
            # Written only where calibrated, so other plans' text is unchanged.
            **({"gradient_handoff_s": handoff} if handoff else {}),
            "grad_sync_s": parts["grad_sync"],
            "hidden_grad_sync_s": parts["grad_sync"] - parts["exposed_grad_sync"],
            "build_s": problem.build_seconds,
            "solve_s": sol.solve_seconds,
            **({"start": sol.start} if sol.start else {}),
            **({"recompute_compute_s": recompute_s[0], "recompute_comm_s": recompute_s[1],
                "memory_kept_bytes": problem.memory_of(sol.choice)} if sol.recompute else {}),
        },
        recompute=[n.name for n in sol.recompute],
    )
    plan.rows = layer_rows(gm, assignment, problem, sol.choice)
    plan.fallbacks = _fallback_notes(problem, sol.choice)
    if sol.status != "optimal":
        found = f"the {sol.start} plan, a start the solver did not improve on in time" if sol.start else "the best found"
        plan.fallbacks.append(
            f"the solver stopped at its time limit ({time_limit_s} s): the plan is {found}, within "
            f"{sol.gap:.2%} of the optimum (raise time_limit_s to close the gap)"
        )
    for note in plan.fallbacks:
        warnings.warn(note, FallbackWarning, stacklevel=3)
    return plan, problem


def _fallback_notes(problem: Problem, choice) -> list[str]:
    notes = []
    for n in problem.nodes:
        if not n.meta.get("fxpar_fallback"):
            continue
        compute = problem.cost_model.compute_time(n, problem.strategies[n][0])
        gather = sum(problem.edge_cost(e, choice[e.producer], choice[n]) for e in problem.edges if e.consumer is n)
        notes.append(
            f"%{n.name} ({n.target}) {n.meta.get('fxpar_fallback_reason', 'has no sharding rule')} and runs "
            "replicated on every device: "
            f"{compute * 1e6:.1f} us of compute per device plus {gather * 1e6:.1f} us gathering its inputs "
            "(plan with strict=True to make this an error)"
        )
    return notes


def plan(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    cluster: Cluster | None = None,
    mesh_shape: Sequence[int] | None = None,
    optimizer: str = "adam",
    force: dict[str, str] | None = None,
    time_limit_s: float = 60.0,
    strict: bool = False,
    plan_cache: str | os.PathLike | None = None,
    recompute: bool = True,
    input_placement: str = "shard",
    batch_norm: str = "global",
) -> Plan:
    """Plan ``model``'s training step on ``example_inputs`` (the global batch) for a mesh.

    ``force`` pins nodes or parameters (by node name or parameter name) to a strategy, written as
    its output spec (``"S(0)"``, ``"(R,S(1))"``) or its full label; the rest is still optimized.
    An op without a sharding rule runs replicated, with a ``FallbackWarning`` naming it and its
    cost; ``strict=True`` makes that an ``UnsupportedOpError``. With ``plan_cache=DIR`` a plan made
    before for the same graph and options is read from ``DIR`` instead of solved
    (``fxpar.plan_cache``). With ``recompute`` (the default), the solver may also choose to
    recompute activations in the backward pass where memory demands it (``plan.recompute``);
    ``recompute=False`` keeps every activation. ``input_placement``: how the ranks will be given
    the batch, ``"shard"`` (each its slice of dim 0, the default) or ``"replicate"`` (each the
    whole batch; the plan may then cut it locally, at no communication). ``batch_norm``: the
    statistics the step will use, as ``fxpar.compile``'s option: ``"global"`` prices a batch norm
    over a cut batch with its statistics' collectives, ``"local"`` without them
    (``plan.batch_norm``).
    """
    check_options(optimizer=optimizer, force=force, time_limit_s=time_limit_s)
    if not isinstance(recompute, bool):
        raise PlanOptionError(f"recompute is {describe_value(recompute)}; give True or False")
    check_input_placement(input_placement)
    check_batch_norm(batch_norm)
    resolve_mesh(cluster, mesh_shape)
    with stage(f"capturing the training step of {type(model).__name__}"):
        gm = capture_and_annotate(model, example_inputs, input_placement=input_placement, batch_norm=batch_norm)
    if plan_cache is not None:
        from fxpar.plan_cache import cached_plan

        return cached_plan(
            gm, plan_cache=plan_cache, cluster=cluster, mesh_shape=mesh_shape, optimizer=optimizer, force=force,
            time_limit_s=time_limit_s, strict=strict, recompute=recompute,
        )
    return plan_graph(
        gm, cluster=cluster, mesh_shape=mesh_shape, optimizer=optimizer, force=force, time_limit_s=time_limit_s,
        strict=strict, recompute=recompute,
    )[0]
