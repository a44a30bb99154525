"""``fxpar.compile``: plan (or take a plan), rewrite for this rank, and wrap as a trainable module."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.fx import GraphModule

from fxpar.cluster import Cluster, preset
from fxpar.errors import CaptureError, ClusterSpecError, IdleRankError, ShardingError
from fxpar.passes.rewrite import rewrite
from fxpar.placement import replicated
from fxpar.plan import Plan
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.runtime.codegen import bucket_collectives, check_codegen, compile_step
from fxpar.runtime.steps import RankMesh, reshard


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


class _Step(torch.autograd.Function):
    """The whole joint step as one autograd op: forward computes loss and gradients; backward
    hands the gradients (scaled by the incoming gradient of the loss) to the parameters."""

    @staticmethod
    def forward(ctx, module: FxparModule, num_rest: int, *args):
        # args: the parameter shards, then buffers and inputs (num_rest of them).
        num_params = len(module._shards)
        with torch.no_grad():
            loss, *outs = module.step_fn(*[a.detach() for a in args])
            grads, updates = outs[:num_params], outs[num_params:]
            for slot, value in zip(module._updated_slots, updates):
                getattr(module, f"_buffer{slot}").copy_(value)
        ctx.num_rest = num_rest
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [g * grad_loss for g in ctx.saved_tensors]
        return (None, None, *grads, *([None] * ctx.num_rest))



class FxparModule(nn.Module):
    """A model's training step split over the ranks of a mesh.

    ``parameters()`` are this rank's shards, so a stock optimizer updates them; ``forward(*batch)``
    takes this rank's slice of the global batch and returns the global loss; ``state_dict()`` gives
    full tensors under the model's own keys. Calling forward computes the gradients too (the joint
    graph runs as one piece); ``loss.backward()`` then delivers them.
    """

    is_active = True

    def __init__(self, plan: Plan, graph: GraphModule, local_graph: GraphModule, mesh: RankMesh, params: dict,
                 buffers: dict, input_shapes: list[tuple[int, ...]], codegen: str):
        super().__init__()
        self.plan = plan
        self.graph = graph
        self.local_graph = local_graph
        self.mesh = mesh
        device = next(iter(params.values())).device if params else torch.device("cpu")
        self.step_fn = compile_step(local_graph, codegen, device)
        self._names = list(params)
        self._shards = nn.ParameterList([nn.Parameter(t) for t in params.values()])
        self._buffer_names = list(buffers)
        for i, b in enumerate(buffers.values()):
            self.register_buffer(f"_buffer{i}", b)
        self._input_shapes = input_shapes
        self._updated_slots = [self._buffer_names.index(fqn) for kind, fqn in graph.meta["fxpar_outputs"] if kind == "buffer"]

    @property
    def num_ranks(self) -> int:
        """Ranks the plan runs on (ranks 0..num_ranks-1); the global batch is cut into this many slices."""
        return math.prod(self.plan.mesh_shape)

    @property
    def codegen(self) -> str:
        """``"inductor"`` or ``"eager"``: how the step runs (eager also where Inductor fell back)."""
        return self.step_fn.codegen

    @property
    def compile_s(self) -> float:
        """Seconds the code generator took (on the first call; 0 for eager)."""
        return self.step_fn.compile_s

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self._input_shapes):
            raise CaptureError(f"expected {len(self._input_shapes)} inputs (as planned), got {len(inputs)}")
        for i, (x, shape) in enumerate(zip(inputs, self._input_shapes)):
            if tuple(x.shape) != shape:
                raise ShardingError(
                    f"input[{i}] on this rank has shape {list(x.shape)} but the plan expects this rank's slice "
                    f"of the global batch, {list(shape)}; pass inputs[i].chunk({self.num_ranks})[rank] (the plan's "
                    f"{self.num_ranks} ranks)"
                )
        buffers = [getattr(self, f"_buffer{i}") for i in range(len(self._buffer_names))]
        return _Step.apply(self, len(buffers) + len(inputs), *self._shards, *buffers, *inputs)

    def named_shards(self) -> dict[str, nn.Parameter]:
        return dict(zip(self._names, self._shards))

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Full tensors under the original keys (gathers the shards: every rank must call it)."""
        rep = replicated(len(self.plan.mesh_shape))
        out = {}
        with torch.no_grad():
            for name, shard in zip(self._names, self._shards):
                out[name] = reshard(shard.detach(), self.plan.param_specs[name], rep, self.mesh)
        for i, name in enumerate(self._buffer_names):
            out[name] = getattr(self, f"_buffer{i}").detach().clone()
        return out


class IdleModule(nn.Module):
    """What ``fxpar.compile`` returns on a rank the plan does not use: it holds no parameters, and
    calling it raises ``IdleRankError``. Check ``is_active`` and skip the training loop."""

    is_active = False

    def __init__(self, plan: Plan, rank: int):
        super().__init__()
        self.plan = plan
        self.rank = rank

    @property
    def num_ranks(self) -> int:
        return math.prod(self.plan.mesh_shape)

    def _idle(self, what: str) -> IdleRankError:
        return IdleRankError(
            f"rank {self.rank} is idle: the plan's mesh {list(self.plan.mesh_shape)} runs on ranks 0..{self.num_ranks - 1}, "
            f"so {what} has nothing to do here; check `compiled.is_active` and skip the step on idle ranks"
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise self._idle("the step")

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        raise self._idle("state_dict() (call it on the active ranks)")


def compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    cluster: Cluster | None = None,
    mesh_shape: Sequence[int] | None = None,
    plan: Plan | None = None,
    optimizer: str = "adam",
    codegen: str = "inductor",
) -> FxparModule | IdleModule:
    """Parallelize ``model``'s training step over the current process group.

    ``example_inputs`` hold the global batch (their values are not used). Rank 0 plans and sends the
    plan to the others unless ``plan`` is given; parameters are taken from rank 0, as DDP does.
    A mesh (or plan) on fewer devices than the group has runs on ranks ``0..k-1``; every rank must
    still call ``compile`` (the groups are made collectively), and the others get an
    ``IdleModule`` (``is_active`` False) to skip training with.

    ``codegen``: ``"inductor"`` compiles the rank's step with torch Inductor on its first call (a
    ``FallbackWarning`` and eager execution where no C++ compiler is found on CPU); ``"eager"`` runs
    the graph op by op.
    """
    check_codegen(codegen)
    init_distributed()
    world = dist.get_world_size()
    rank = dist.get_rank()
    if mesh_shape is None:
        mesh_shape = plan.mesh_shape if plan is not None else (world,)
    mesh = tuple(int(s) for s in mesh_shape)
    num_used = math.prod(mesh)
    if num_used > world or num_used < 1:
        raise ClusterSpecError(
            f"mesh {list(mesh)} has {num_used} devices but the process group has {world} ranks; "
            f"give a mesh_shape whose sizes multiply to at most {world}"
        )
    for name, p in model.named_parameters():
        if p.device.type == "meta":  # noqa: SIM102
            raise CaptureError(f"parameter {name} is on the meta device; fxpar.plan accepts that, compile needs real values")
    active = rank < num_used
    gm = capture_and_annotate(model, example_inputs) if active else None
    if plan is None:
        box = [None]
        if rank == 0:
            made, _ = plan_graph(gm, cluster=cluster or local_cluster(world), mesh_shape=mesh, optimizer=optimizer)
            box = [made.to_json()]
        dist.broadcast_object_list(box, src=0)
        plan = Plan.from_json(box[0])
    if tuple(plan.mesh_shape) != mesh:
        raise ClusterSpecError(f"the plan is for mesh {list(plan.mesh_shape)}, not {list(mesh)}")
    device = next(model.parameters()).device
    if num_used == world:
        device_mesh = init_device_mesh(device.type, mesh)
        group = None
    else:
        # Sub-groups are created collectively: every rank joins, even the ones left idle.
        device_mesh = DeviceMesh(device.type, torch.arange(num_used).reshape(mesh))
        group = dist.new_group(list(range(num_used)))
    if not active:
        return IdleModule(plan, rank)
    assignment = plan.assignment(gm)
    rank_mesh = RankMesh.from_device_mesh(device_mesh)
    local_gm = rewrite(gm, assignment, mesh, coords=rank_mesh.coords, group_names=rank_mesh.group_names, device=device)
    rep = replicated(len(mesh))
    params, buffers = {}, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            full = p.detach().clone()
            dist.broadcast(full, src=0, group=group)
            params[name] = reshard(full, rep, plan.param_specs[name], rank_mesh).clone()
        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        for name, b in frozen + list(model.named_buffers()):
            full = b.detach().clone()
            dist.broadcast(full, src=0, group=group)
            buffers[name] = full
    input_shapes = []
    for x in example_inputs:
        shape = list(x.shape)
        shape[0] //= num_used
        input_shapes.append(tuple(shape))
    local_inputs = [*params.values(), *buffers.values(),
                    *[torch.empty(s, dtype=x.dtype, device=device) for s, x in zip(input_shapes, example_inputs)]]
    bucket_collectives(local_gm, local_inputs)
    return FxparModule(plan, gm, local_gm, rank_mesh, params, buffers, input_shapes, codegen)
