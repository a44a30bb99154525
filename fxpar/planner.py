"""``fxpar.plan``: capture, annotate, enumerate strategies, solve; no process group needed."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from fxpar.cluster import Cluster, preset
from fxpar.cost import CostModel
from fxpar.errors import ClusterSpecError, FallbackWarning, InfeasiblePlanError, PlanTimeoutError
from fxpar.passes.annotate import annotate
from fxpar.passes.capture import capture
from fxpar.placement import spec_str
from fxpar.plan import Plan, layer_rows
from fxpar.solve.ilp import Infeasible, SolverTimeout, min_memory, solve
from fxpar.solve.problem import OPTIMIZER_STATE_FACTOR, Problem, build_problem
from fxpar.solve.strategies import all_strategies


def resolve_mesh(cluster: Cluster | None, mesh_shape: Sequence[int] | None) -> tuple[Cluster, tuple[int, ...]]:
    if mesh_shape is None:
        if cluster is None:
            raise ClusterSpecError("give a cluster, a mesh_shape, or both (e.g. mesh_shape=(2,))")
        mesh_shape = (cluster.num_devices,)
    mesh = tuple(int(s) for s in mesh_shape)
    if not mesh or any(s < 1 for s in mesh):
        raise ClusterSpecError(f"mesh_shape {list(mesh_shape)} must be a non-empty list of positive sizes")
    if cluster is None:
        cluster = preset("cpu-local", num_devices=math.prod(mesh))
    if math.prod(mesh) > cluster.num_devices:
        raise ClusterSpecError(
            f"mesh {list(mesh)} needs {math.prod(mesh)} devices but cluster {cluster.name!r} has "
            f"{cluster.num_devices}; use a smaller mesh or a larger cluster"
        )
    cluster.link(0, len(mesh))  # validates the number of link levels
    return cluster, mesh


def capture_and_annotate(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> GraphModule:
    return annotate(capture(model, example_inputs))


def _apply_force(problem: Problem, force: dict[str, str]) -> None:
    by_name = {n.name: n for n in problem.nodes}
    by_fqn = {n.meta.get("fxpar_fqn"): n for n in problem.nodes if n.op == "placeholder"}
    for key, want in force.items():
        node = by_name.get(key) or by_fqn.get(key)
        if node is None:
            raise ClusterSpecError(f"force names {key!r}, which is neither a node nor a parameter of the graph")
        allowed = {
            k for k, s in enumerate(problem.strategies[node]) if want in (s.label(), spec_str(s.outputs[0]))
        }
        if not allowed:
            options = sorted({s.label() for s in problem.strategies[node]})
            raise ClusterSpecError(f"force[{key!r}] = {want!r} is not a strategy of %{node.name}; it has {options}")
        problem.forced[node] = allowed


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
) -> tuple[Plan, Problem]:
    if optimizer not in OPTIMIZER_STATE_FACTOR:
        raise ClusterSpecError(f"unknown optimizer {optimizer!r}; known: {sorted(OPTIMIZER_STATE_FACTOR)}")
    cluster, mesh = resolve_mesh(cluster, mesh_shape)
    cost_model = CostModel(cluster, mesh)
    start = time.perf_counter()
    strategies = all_strategies(gm, mesh, strict=strict)
    problem = build_problem(gm, strategies, cost_model, optimizer=optimizer, simplify=simplify)
    problem.build_seconds = time.perf_counter() - start
    if force:
        _apply_force(problem, force)
    try:
        try:
            sol = solve(problem, time_limit_s=time_limit_s)
        except Infeasible:
            if not simplify:
                raise
            # The simplifications restrict the search space; the full problem may still fit.
            problem = build_problem(gm, strategies, cost_model, optimizer=optimizer, simplify=False)
            problem.build_seconds = time.perf_counter() - start
            if force:
                _apply_force(problem, force)
            sol = solve(problem, time_limit_s=time_limit_s)
    except Infeasible:
        need = min_memory(problem)
        raise InfeasiblePlanError(
            f"no plan fits: on mesh {list(mesh)} the smallest plan needs {need / 2**30:.2f} GiB per device "
            f"(parameters, gradients, {optimizer} state and live activations) but {cluster.device.name} has "
            f"{cluster.device.memory_bytes / 2**30:.2f} GiB; use more devices, a smaller batch or model, "
            "or a cluster with more memory"
        ) from None
    except SolverTimeout as exc:
        raise PlanTimeoutError(
            f"{exc} for {len(problem.nodes)} nodes on mesh {list(mesh)}; raise time_limit_s (now {time_limit_s})"
        ) from None
    assignment = {n: problem.strategies[n][k] for n, k in sol.choice.items()}
    parts = problem.breakdown(sol.choice)
    compute = sum(cost_model.compute_time(n, problem.strategies[n][k]) for n, k in sol.choice.items())
    params = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta["fxpar_role"] == "param"]
    plan = Plan(
        mesh_shape=mesh,
        cluster=cluster,
        strategies={n.name: s for n, s in assignment.items()},
        predicted_step_s=sol.objective,
        compute_s=compute,
        comm_s=sol.objective - compute,
        memory_bytes=problem.memory_of(sol.choice),
        param_specs={p.meta["fxpar_fqn"]: assignment[p].outputs[0] for p in params},
        optimizer=optimizer,
        solver={
            "status": sol.status,
            "gap": sol.gap,
            "num_variables": sol.num_variables,
            "num_constraints": sol.num_constraints,
            "num_nodes": len(problem.nodes),
            "num_classes": sol.num_classes,
            "num_memory_sets": sol.num_memory_sets,
            "num_live_sets": len(problem.live_sets),
            "grad_sync_s": parts["grad_sync"],
            "hidden_grad_sync_s": parts["grad_sync"] - parts["exposed_grad_sync"],
            "build_s": problem.build_seconds,
            "solve_s": sol.solve_seconds,
        },
    )
    plan.rows = layer_rows(gm, assignment, problem, sol.choice)
    plan.fallbacks = _fallback_notes(problem, sol.choice)
    if sol.status != "optimal":
        plan.fallbacks.append(
            f"the solver stopped at its time limit ({time_limit_s} s): the plan is the best found, within "
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
            f"%{n.name} ({n.target}) has no sharding rule and runs replicated on every device: "
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
) -> Plan:
    """Plan ``model``'s training step on ``example_inputs`` (the global batch) for a mesh.

    ``force`` pins nodes or parameters (by node name or parameter name) to a strategy, written as
    its output spec (``"S(0)"``, ``"(R,S(1))"``) or its full label; the rest is still optimized.
    An op without a sharding rule runs replicated, with a ``FallbackWarning`` naming it and its
    cost; ``strict=True`` makes that an ``UnsupportedOpError``.
    """
    gm = capture_and_annotate(model, example_inputs)
    return plan_graph(
        gm, cluster=cluster, mesh_shape=mesh_shape, optimizer=optimizer, force=force, time_limit_s=time_limit_s,
        strict=strict,
    )[0]
