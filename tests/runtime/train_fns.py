"""Rank functions for the real multi-process tests (importable, as spawn needs)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import fxpar
from fxpar.models import MLP


def rank0_inputs(gm, assignment: dict, mesh_shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Zero tensors of rank 0's local shapes for the placeholders of ``gm`` under ``assignment``
    (each placeholder cut by its strategy's output spec), as ``codegen.bucket_collectives`` takes."""
    from fxpar.runtime.simulate import shard_for_ranks

    return [shard_for_ranks(torch.zeros(tuple(n.meta["val"].shape), dtype=n.meta["val"].dtype),
                            assignment[n].outputs[0], mesh_shape)[0]
            for n in gm.graph.nodes if n.op == "placeholder"]


def reference_training(model_fn, inputs_fn, num_steps: int, lr: float = 0.05, seed: int = 0):
    torch.manual_seed(seed)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(num_steps):
        batch = inputs_fn(step)
        loss = model(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def mlp_model():
    return MLP((16, 64, 32, 8))


def mlp_inputs(step: int, batch: int = 16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(batch, 16, generator=g), torch.randint(0, 8, (batch,), generator=g)


def train_mlp_steps(step_fn, parameters, rank: int, world: int, num_steps: int, lr: float = 0.05,
                    whole_batch: bool = False) -> list[float]:
    """SGD with momentum through ``step_fn`` on this rank's slice of each global batch (on all of
    it with ``whole_batch``)."""
    opt = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    losses = []
    for step in range(num_steps):
        x, y = mlp_inputs(step)
        loss = step_fn(x, y) if whole_batch else step_fn(x.chunk(world)[rank], y.chunk(world)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_fxpar(rank: int, mesh_shape, num_steps: int, force=None, cluster_name=None, lr: float = 0.05,
                codegen: str = "eager"):
    torch.manual_seed(0)
    model = mlp_model()
    world = dist.get_world_size()
    cluster = fxpar.preset(cluster_name, num_devices=world) if cluster_name else None
    plan = None
    if force is not None:
        plan = fxpar.plan(model, mlp_inputs(0), cluster=cluster, mesh_shape=mesh_shape, force=force)
    compiled = fxpar.compile(model, mlp_inputs(0), cluster=cluster, mesh_shape=mesh_shape, plan=plan, codegen=codegen)
    losses = train_mlp_steps(compiled, compiled.parameters(), rank, world, num_steps, lr)
    return losses, compiled.state_dict(), compiled.plan.to_json(), compiled.codegen


def train_fxpar_whole_batch(rank: int, mesh_shape, num_steps: int, force=None, codegen: str = "eager"):
    """``train_fxpar`` with ``input_placement="replicate"``: every rank passes the whole batch.
    Also returns the plan's placements of the inputs and the shapes the rank's graph takes them in."""
    torch.manual_seed(0)
    model = mlp_model()
    world = dist.get_world_size()
    plan = None
    if force is not None:
        plan = fxpar.plan(model, mlp_inputs(0), mesh_shape=mesh_shape, force=force, input_placement="replicate")
    compiled = fxpar.compile(model, mlp_inputs(0), mesh_shape=mesh_shape, plan=plan, codegen=codegen,
                             input_placement="replicate")
    losses = train_mlp_steps(compiled, compiled.parameters(), rank, world, num_steps, whole_batch=True)
    inputs = [n.name for n in compiled.graph.graph.nodes if n.meta.get("fxpar_role") == "input"]
    local = {n.name: tuple(n.meta["val"].shape) for n in compiled.local_graph.graph.nodes if n.op == "placeholder"}
    return losses, compiled.state_dict(), compiled.plan.to_json(), compiled.codegen, \
        [[repr(p) for p in compiled.plan.strategies[n].outputs[0]] for n in inputs], [local.get(n) for n in inputs]


def train_torch_compile(rank: int, num_steps: int, options=None, lr: float = 0.05):
    torch.manual_seed(0)
    model = mlp_model()
    world = dist.get_world_size()
    compiled = torch.compile(model, backend="fxpar", options={"codegen": "eager", **(options or {})})
    losses = train_mlp_steps(compiled, model.parameters(), rank, world, num_steps, lr)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def fail_on_rank_one(rank: int):
    if rank == 1:
        raise ValueError("rank 1 says no")
    dist.barrier()
    return rank


def world_info(rank: int):
    return rank, dist.get_world_size()


def pass_global_batch(rank: int):
    compiled = fxpar.compile(mlp_model(), mlp_inputs(0), codegen="eager")
    return compiled(*mlp_inputs(0))


def backend_with_smaller_mesh(rank: int):
    compiled = torch.compile(mlp_model(), backend="fxpar", options={"mesh_shape": (1,), "codegen": "eager"})
    x, y = mlp_inputs(0)
    return compiled(x.chunk(2)[rank], y.chunk(2)[rank])


def finish_torchrun_rank(out_path: str, payload: dict) -> None:
    """End a torchrun test script's rank: rank 0 saves ``payload``, every rank waits for the others
    to be past their last collective, the groups go away, and the process exits without
    interpreter finalization. (Under load, a C++ thread that torch's distributed runtime leaves
    joinable is destroyed during finalization about once in ten runs: "terminate called without an
    active exception", SIGABRT with no Python frame left, failing a run that succeeded.)"""
    import os
    import sys

    if dist.get_rank() == 0:
        torch.save(payload, out_path)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pass_slice_with_whole_batch_placement(rank: int):
    compiled = fxpar.compile(mlp_model(), mlp_inputs(0), codegen="eager", input_placement="replicate")
    x, y = mlp_inputs(0)
    return compiled(x.chunk(2)[rank], y.chunk(2)[rank])


def compile_with_plan_of_other_placement(rank: int):
    plan = fxpar.plan(mlp_model(), mlp_inputs(0), mesh_shape=(2,), input_placement="replicate")
    return fxpar.compile(mlp_model(), mlp_inputs(0), plan=plan, codegen="eager")


def compile_with_plan_of_other_batch_norm(rank: int):
    plan = fxpar.plan(mlp_model(), mlp_inputs(0), mesh_shape=(2,))
    return fxpar.compile(mlp_model(), mlp_inputs(0), plan=plan, codegen="eager", batch_norm="local")
