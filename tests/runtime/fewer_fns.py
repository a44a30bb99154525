"""Rank functions for the fewer-ranks-than-the-group tests (importable, as spawn needs)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import fxpar
from fxpar.errors import IdleRankError
from fxpar.errors import ClusterSpecError

from .train_fns import mlp_inputs, mlp_model


def _train(rank: int, compiled, num_steps: int, lr: float) -> tuple[list[float], dict]:
    k = compiled.num_ranks
    opt = torch.optim.SGD(compiled.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(num_steps):
        x, y = mlp_inputs(step)
        loss = compiled(x.chunk(k)[rank], y.chunk(k)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, compiled.state_dict()


def _idle_report(compiled) -> str:
    try:
        compiled(*mlp_inputs(0))
    except IdleRankError as exc:
        return str(exc)
    return "forward on an idle rank did not raise"


def _too_big_error(model) -> str:
    world = dist.get_world_size()
    try:
        fxpar.compile(model, mlp_inputs(0), mesh_shape=(world + 1,))
    except ClusterSpecError as exc:
        return str(exc)
    return "a mesh larger than the group was accepted"


def train_on_fewer(rank: int, mesh_shape, num_steps: int, force=None, lr: float = 0.05):
    """Train on the first prod(mesh_shape) ranks; returns ("active", losses, state, plan json,
    error) or ("idle", the error an idle rank's forward raises, error), where error is what
    compile says to a mesh larger than the group."""
    torch.manual_seed(0)
    model = mlp_model()
    too_big = _too_big_error(model)
    plan = None
    if force is not None:
        cluster = fxpar.preset("cpu-local", num_devices=math.prod(mesh_shape))
        plan = fxpar.plan(model, mlp_inputs(0), cluster=cluster, mesh_shape=mesh_shape, force=force)
    compiled = fxpar.compile(model, mlp_inputs(0), mesh_shape=mesh_shape, plan=plan, codegen="eager")
    if not compiled.is_active:
        return "idle", _idle_report(compiled), too_big
    losses, state = _train(rank, compiled, num_steps, lr)
    return "active", losses, state, compiled.plan.to_json(), too_big
