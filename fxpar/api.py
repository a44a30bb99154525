"""``fxpar.compile``: plan (or take a plan), rewrite for this rank, and wrap as a trainable module."""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.fx import GraphModule

from fxpar.cluster import Cluster, describe_value, preset
from fxpar.errors import CaptureError, ClusterSpecError, PlanMismatchError, PlanOptionError
from fxpar.placement import replicated
from fxpar.plan import Plan
from fxpar.plan_cache import cached_plan
from fxpar.planner import capture_and_annotate, check_batch_norm, check_input_placement, plan_graph, resolve_mesh
from fxpar.runtime.agree import Control, broadcast_text, check_same, together
from fxpar.runtime.codegen import check_codegen
from fxpar.runtime.module import FxparModule, IdleModule, Runtime, build_variant, dtensor_placements
from fxpar.runtime.steps import RankMesh, reshard

__all__ = ["FxparModule", "IdleModule", "compile", "init_distributed", "local_cluster"]


def init_distributed() -> None:
    """Initialize the default process group from torchrun's environment if it is not yet."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ClusterSpecError(
            "fxpar.compile needs a torch.distributed process group: run under torchrun, call "
            "torch.distributed.init_process_group(...), or use fxpar.launch(fn, nprocs)"
        )
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def local_cluster(num_devices: int) -> Cluster:
    """A preset for the devices this process runs on (pass ``cluster=`` for measured figures)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, p in (("H200", "h200-nvlink-8"), ("H100", "h100-2node-16"), ("A100", "a100-nvlink-8"), ("V100", "v100-nvlink-8")):
            if key in name:
                c = preset(p, num_devices=num_devices)
                return Cluster(c.name, c.device, num_devices, c.links[-1:], c.source)
    return preset("cpu-local", num_devices=num_devices)


def _summary(model: nn.Module, example_inputs, mesh, plan, codegen, optimizer, plan_cache, recompute, batch_norm,
             input_placement) -> dict:
    """What every rank must agree on before the step is planned (compared by ``check_same``)."""
    tensors = lambda items: {n: [list(t.shape), str(t.dtype), t.requires_grad] for n, t in items}  # noqa: E731
    return {
        "mesh_shape": list(mesh),
        "codegen": codegen,
        "optimizer": optimizer,
        "plan": None if plan is None else hashlib.sha256(plan.to_json().encode()).hexdigest()[:16],
        "plan_cache": plan_cache is not None,
        "recompute": recompute,
        "batch_norm": batch_norm,
        "input_placement": input_placement,
        "example_inputs": [[list(x.shape), str(x.dtype)] for x in example_inputs],
        "parameters": tensors(model.named_parameters()),
        "buffers": {n: [list(b.shape), str(b.dtype)] for n, b in model.named_buffers()},
    }


def _check_arguments(model, example_inputs, mesh_shape, plan, codegen, recompute, batch_norm, input_placement,
                     world: int) -> tuple[int, ...]:
    check_codegen(codegen)
    check_input_placement(input_placement)
    check_batch_norm(batch_norm)
    if not isinstance(recompute, bool):
        raise PlanOptionError(f"recompute is {describe_value(recompute)}; give True or False")
    if plan is not None and not isinstance(plan, Plan):
        raise PlanOptionError(f"plan is {describe_value(plan)}; give a fxpar.Plan (e.g. fxpar.Plan.from_json(text)) or None")
    if not isinstance(model, nn.Module):
        raise CaptureError(f"model is {describe_value(model)}; give the torch.nn.Module to train")
    if not isinstance(example_inputs, (tuple, list)) or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise CaptureError("example_inputs must be a tuple or list of tensors (the global batch)")
    if mesh_shape is None:
        mesh_shape = plan.mesh_shape if plan is not None else (world,)
    _, mesh = resolve_mesh(None, mesh_shape)  # PlanOptionError for sizes that are not whole numbers
    if math.prod(mesh) > world:
        raise ClusterSpecError(
            f"mesh {list(mesh_shape)} has {math.prod(mesh_shape)} devices but the process group has {world} ranks; "
            f"give a mesh_shape whose sizes multiply to at most {world}"
        )
    if plan is not None and tuple(plan.mesh_shape) != mesh:
        raise ClusterSpecError(f"the plan is for mesh {list(plan.mesh_shape)}, not {list(mesh)}")
    if plan is not None and plan.input_placement != input_placement:
        raise PlanMismatchError(
            f"the plan was made for input_placement={plan.input_placement!r} but compile was given "
            f"input_placement={input_placement!r}; pass input_placement={plan.input_placement!r} (and feed the ranks "
            "accordingly) or plan again"
        )
    if plan is not None and plan.batch_norm != batch_norm:
        raise PlanMismatchError(
            f"the plan was priced for batch_norm={plan.batch_norm!r} but compile was given batch_norm={batch_norm!r}; "
            f"pass batch_norm={plan.batch_norm!r} or plan again with fxpar.plan(..., batch_norm={batch_norm!r})"
        )
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise CaptureError(f"parameter {name} is on the meta device; fxpar.plan accepts that, compile needs real values")
        if isinstance(p, DTensor):
            raise CaptureError(f"parameter {name} is already a DTensor; give fxpar.compile the model with plain parameters")
    for name in _public_names(model):
        if hasattr(FxparModule, name):
            raise CaptureError(
                f"the model has a submodule, parameter or buffer named {name!r}, which the compiled module uses for "
                f"its own attribute of that name; rename it in the model"
            )
    return mesh


def _public_names(model: nn.Module) -> list[str]:
    return [*model._modules, *model._parameters, *model._buffers]


def _place(model: nn.Module, plan: Plan, device_mesh: DeviceMesh, rank_mesh: RankMesh, group) -> nn.Module:
    """A copy of ``model`` whose parameters are DTensors in the plan's layout, holding rank 0's
    values (broadcast, as DDP starts), and whose buffers are rank 0's; tied parameters stay tied."""
    rep = replicated(len(plan.mesh_shape))
    memo: dict[int, object] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = p.detach().clone()
            dist.broadcast(full, src=0, group=group)
            spec = plan.param_specs[name] if p.requires_grad else rep
            local = reshard(full, rep, spec, rank_mesh).clone()
            value = DTensor.from_local(local, device_mesh, dtensor_placements(spec), run_check=False,
                                       shape=full.shape, stride=full.stride())
            memo[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
        for _, b in model.named_buffers():
            full = b.detach().clone()
            dist.broadcast(full, src=0, group=group)
            memo[id(b)] = full
    for m in model.modules():
        if isinstance(m, GraphModule) and not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()):
            memo[id(m)] = m  # stateless code (dynamo's graph, whose metadata holds dynamo's fake tensors): shared
    return copy.deepcopy(model, memo)


def compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    cluster: Cluster | None = None,
    mesh_shape: Sequence[int] | None = None,
    plan: Plan | None = None,
    optimizer: str = "adam",
    codegen: str = "inductor",
    plan_cache: str | os.PathLike | None = None,
    recompute: bool = True,
    batch_norm: str = "global",
    input_placement: str = "shard",
) -> FxparModule | IdleModule:
    """Parallelize ``model``'s training step over the current process group.

    ``example_inputs`` hold the global batch (their values are not used). Rank 0 plans and sends the
    plan (as JSON) to the others unless ``plan`` is given; with ``plan_cache=DIR`` rank 0 reads a plan
    made before for the same graph and options from ``DIR`` (``fxpar.plan_cache``) instead of
    solving. Parameters are taken from rank 0, as DDP does. A mesh (or plan) on fewer devices than
    the group has runs on ranks ``0..k-1``; every rank must still call ``compile`` (the groups are
    made collectively), and the others get an ``IdleModule`` (``is_active`` False) to skip training
    with.

    Ranks fail together: an error on any rank (bad arguments, a model that does not capture, a plan
    that does not fit) is raised on every rank, with that rank's message. Before anything is
    planned, the ranks compare their options, example input shapes and parameter shapes, and after
    planning the captured graph and the plan; the first difference is a ``PlanMismatchError``.

    ``recompute`` (as for ``fxpar.plan``): the solver may recompute activations in the backward pass
    where memory demands it; ``False`` keeps every activation.

    ``batch_norm``: how a batch norm over a batch cut between devices computes its statistics:
    ``"global"`` (the default; the whole batch's, as one device computes them, at one small
    collective per layer and direction) or ``"local"`` (each device's own slice, DDP's semantics:
    no collective in the forward, numerics of per-device statistics; the running statistics are the
    average of the devices' updates).

    ``input_placement``: how each rank's call is given the batch. ``"shard"`` (the default): each
    rank passes its slice of the global batch, ``x.chunk(num_ranks)[rank]`` along dim 0, as with
    DDP. ``"replicate"``: every rank passes the whole global batch, as torch's tensor parallelism
    feeds its ranks; the plan then needs no collective to bring a cut batch together (it may still
    cut the batch locally). Every rank must pass the same values.

    ``codegen``: ``"inductor"`` compiles the rank's step with torch Inductor on its first call (a
    ``FallbackWarning`` and eager execution where no C++ compiler is found on CPU); ``"eager"`` runs
    the graph op by op.
    """
    init_distributed()
    world = dist.get_world_size()
    rank = dist.get_rank()
    control = Control.create(range(world))
    mesh = together(control, "checking fxpar.compile's arguments",
                    lambda: _check_arguments(model, example_inputs, mesh_shape, plan, codegen, recompute, batch_norm,
                                             input_placement, world))
    check_same(control, _summary(model, example_inputs, mesh, plan, codegen, optimizer, plan_cache, recompute, batch_norm,
                                 input_placement), "the model and options")
    num_used = math.prod(mesh)
    # A rank the mesh leaves idle neither plans nor runs the step: it does not capture it either.
    active = rank < num_used
    gm = together(control, "capturing the step",
                  lambda: capture_and_annotate(model, example_inputs, input_placement=input_placement,
                                               batch_norm=batch_norm) if active else None)
    if plan is None:
        def solve() -> str | None:
            if rank != 0:
                return None
            options = dict(cluster=cluster or local_cluster(world), mesh_shape=mesh, optimizer=optimizer, recompute=recompute)
            if plan_cache is not None:
                return cached_plan(gm, plan_cache=plan_cache, **options).to_json()
            return plan_graph(gm, **options)[0].to_json()

        text = broadcast_text(control, together(control, "planning", solve), 0)
        plan = Plan.from_json(text)
    check_same(control, {"plan": hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]}, "the plan")
    device = next(model.parameters()).device
    if num_used == world:
        device_mesh = init_device_mesh(device.type, mesh)
        group, active_control = None, control
    else:
        # Sub-groups are created collectively: every rank joins, even the ones left idle.
        device_mesh = DeviceMesh(device.type, torch.arange(num_used).reshape(mesh))
        group = dist.new_group(list(range(num_used)))
        active_control = Control.create(range(num_used))
    if not active:
        return IdleModule(plan, rank)
    check_same(active_control, {"graph": hashlib.sha256(gm.code.encode()).hexdigest()[:16]}, "the captured step")
    rank_mesh = RankMesh.from_device_mesh(device_mesh)
    source = _place(model, plan, device_mesh, rank_mesh, group)
    trainable = [n for n, p in source.named_parameters() if p.requires_grad]
    state = [n for n, p in source.named_parameters() if not p.requires_grad] + [n for n, _ in source.named_buffers()]
    cut = num_used if input_placement == "shard" else 1
    input_shapes = [(x.shape[0] // cut, *x.shape[1:]) for x in example_inputs]
    main_key = (model.training, True, None, None)
    runtime = Runtime(source, device_mesh, rank_mesh, active_control, codegen, device, trainable, state,
                      input_shapes, [x.dtype for x in example_inputs], main_key, batch_norm=batch_norm,
                      input_placement=input_placement)

    def build():
        module = FxparModule(runtime)
        local_inputs = [torch.empty(s, dtype=x.dtype, device="meta") for s, x in zip(input_shapes, example_inputs)]
        runtime.variants[main_key] = build_variant(runtime, main_key, gm, plan, module._step_inputs(local_inputs))
        return module

    return together(active_control, "building the step", build)
