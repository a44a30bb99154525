"""The module ``fxpar.compile`` returns: the user's model, its parameters DTensors, its step planned.

``FxparModule`` holds the model's own submodules under their own names (a copy of the model whose
parameters are ``torch.distributed.tensor.DTensor``s on the plan's ``DeviceMesh``, with the plan's
placements; tied parameters stay one object under every name). So stock torch works on it:
``named_parameters()`` gives the model's names, ``clip_grad_norm_`` the global norm, optimizers
update the shards, ``torch.distributed.checkpoint`` saves and loads them.

A call runs one of several *variants* of the step, each captured, planned and compiled on first
use and then kept: the training step (``self.training``, gradients on) is the one ``compile``
planned; an evaluation call (``eval()``), a ``torch.no_grad()`` call (a forward-only graph, no
gradient work) and a call under ``torch.autocast`` are captured in that mode and planned with every
parameter pinned to its placement (the parameters do not move between variants).

Variants beyond the first are built collectively, inside the call, so every rank of the mesh must
make the same calls in the same modes (as for any step of a parallel training loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.fx import GraphModule

from fxpar import placement as fp
from fxpar.errors import CaptureError, IdleRankError, ShardingError, StepInputError
from fxpar.passes.recompute import apply_recompute
from fxpar.placement import Spec, spec_str
from fxpar.plan import Plan
from fxpar.runtime.agree import Control, arrive, broadcast_text, together
from fxpar.runtime.codegen import build_rank_step
from fxpar.runtime.steps import RankMesh

__all__ = ["FxparModule", "IdleModule", "dtensor_placements"]


def dtensor_placements(spec: Spec) -> tuple:
    """fxpar's ``Spec`` as DTensor placements (one per mesh axis; the same chunk order)."""
    out = []
    for p in spec:
        if isinstance(p, fp.Replicate):
            out.append(Replicate())
        elif isinstance(p, fp.Shard):
            out.append(Shard(p.dim))
        else:
            out.append(Partial())
    return tuple(out)


@dataclass
class Variant:
    """One captured, planned and compiled form of the step."""

    key: tuple
    plan: Plan
    graph: GraphModule
    local_graph: GraphModule
    step_fn: Callable
    num_grads: int
    updated_buffers: list[str]

    def run(self, local_params: Sequence[torch.Tensor], rest: Sequence[torch.Tensor]):
        """(loss, gradients, new buffer values) of this rank."""
        loss, *outs = self.step_fn(*local_params, *rest)
        return loss, outs[: self.num_grads], outs[self.num_grads:]


@dataclass
class Runtime:
    """What an ``FxparModule`` needs besides the model's tensors (not an ``nn.Module`` attribute
    tree, so that no name of it can clash with the model's)."""

    source: nn.Module  # the model copy whose submodules the FxparModule shares
    device_mesh: DeviceMesh
    rank_mesh: RankMesh
    control: Control
    codegen: str
    device: torch.device
    param_names: list[str]  # trainable parameters, in the graph's order
    state_names: list[str]  # frozen parameters then buffers, in the graph's order
    input_shapes: list[tuple[int, ...]]  # this rank's slice of each planned input
    input_dtypes: list[torch.dtype]
    main_key: tuple
    variants: dict[tuple, Variant] = field(default_factory=dict)
    batch_norm: str = "global"  # batch norm's statistics over a cut batch: "global" or "local"
    input_placement: str = "shard"  # each rank's call gets its slice of the batch, or all of it ("replicate")
    state_dict_timeout_s: float = 60.0

    @property
    def main(self) -> Variant:
        return self.variants[self.main_key]

    @property
    def num_ranks(self) -> int:
        return self.rank_mesh.num_devices


def build_variant(runtime: Runtime, key: tuple, gm: GraphModule, plan: Plan, local_inputs: list[torch.Tensor]) -> Variant:
    """Rewrite ``gm`` for this rank under ``plan`` (recomputing what the plan recomputes), bucket its
    collectives and prepare its code."""
    assignment = plan.assignment(gm)
    if plan.recompute:
        gm, assignment = apply_recompute(gm, plan, assignment)
    local_gm, step_fn = build_rank_step(gm, assignment, runtime.rank_mesh, local_inputs, codegen=runtime.codegen,
                                        device=runtime.device, batch_norm=runtime.batch_norm)
    kinds = [kind for kind, _ in gm.meta["fxpar_outputs"]]
    updated = [fqn for kind, fqn in gm.meta["fxpar_outputs"] if kind == "buffer"]
    return Variant(key, plan, gm, local_gm, step_fn, kinds.count("grad"), updated)


def _slot(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the submodule that holds parameter or buffer ``name``, its attribute name)."""
    module_name, _, attr = name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), attr


def _read(module: nn.Module, attr: str) -> torch.Tensor:
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class _Step(torch.autograd.Function):
    """The joint step as one autograd op: its forward computes the loss and the gradients; its
    backward hands the gradients (scaled by the incoming gradient of the loss) to the DTensor
    parameters."""

    @staticmethod
    def forward(ctx, module: FxparModule, variant: Variant, num_params: int, *args):
        params, rest = args[:num_params], args[num_params:]
        with torch.no_grad():
            local = [p._local_tensor for p in params]  # to_local() without its autograd node: grad is off here
            loss, grads, updates = variant.run(local, [r.detach() for r in rest])
            module._apply_updates(variant, updates)
        ctx.layouts = [(p._spec, t.stride()) for p, t in zip(params, local)]
        ctx.num_rest = len(rest)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Fresh tensors (the saved ones may be handed out again, with retain_graph), scaled in one
        # foreach kernel, not one multiplication each (0.55 ms of the toy transformer's 31 ms
        # step on CPU with 36 parameters).
        grads = torch._foreach_mul(list(ctx.saved_tensors), grad_loss)
        return (None, None, None, *[_as_dtensor(g, *layout) for g, layout in zip(grads, ctx.layouts)],
                *([None] * ctx.num_rest))


def _as_dtensor(local: torch.Tensor, spec, param_local_stride) -> DTensor:
    """``local`` (a gradient of this rank) as a DTensor in its parameter's layout. Where it is laid
    out as the parameter's local tensor, the parameter's DTensor spec is reused directly (about 25x
    faster than ``DTensor.from_local``, which rebuilds the spec through an autograd function)."""
    if local.stride() == param_local_stride and local.dtype == spec.tensor_meta.dtype:
        return DTensor(local, spec, requires_grad=False)
    return DTensor.from_local(local, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                              stride=spec.tensor_meta.stride)


class FxparModule(nn.Module):
    """A model's training step split over the ranks of a mesh.

    The model's submodules, parameters (DTensors) and buffers appear under their own names.
    ``forward(*batch)`` takes this rank's slice of the global batch (all of it under
    ``input_placement="replicate"``), by position, and returns the
    global loss; with gradients enabled it computes them too (the joint graph runs as one piece),
    and ``loss.backward()`` delivers them to the parameters. ``state_dict()`` gives full tensors
    (every rank must call it), ``sharded_state_dict()`` the DTensors (for
    ``torch.distributed.checkpoint``); ``load_state_dict`` takes either.
    """

    is_active = True

    def __init__(self, runtime: Runtime):
        super().__init__()
        source = runtime.source
        for name, child in source._modules.items():
            self.add_module(name, child)
        for name, p in source._parameters.items():
            self.register_parameter(name, p)
        for name, b in source._buffers.items():
            self.register_buffer(name, b, persistent=name not in source._non_persistent_buffers_set)
        self.training = source.training
        self._fxpar = runtime
        # Where each graph input lives, found once (a call reads the current tensor from its slot).
        self._param_slots = [_slot(self, n) for n in runtime.param_names]
        self._state_slots = {n: _slot(self, n) for n in runtime.state_names}
        self._register_load_state_dict_pre_hook(self._to_dtensors)

    # -- what fxpar planned ------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The plan of the training step (the one ``compile`` made or was given)."""
        return self._fxpar.main.plan

    @property
    def graph(self) -> GraphModule:
        return self._fxpar.main.graph

    @property
    def local_graph(self) -> GraphModule:
        return self._fxpar.main.local_graph

    @property
    def mesh(self) -> RankMesh:
        return self._fxpar.rank_mesh

    @property
    def device_mesh(self) -> DeviceMesh:
        return self._fxpar.device_mesh

    @property
    def variants(self) -> dict[tuple, Variant]:
        """The step's variants built so far, by (training, grad enabled, autocast dtype, shapes)."""
        return dict(self._fxpar.variants)

    @property
    def num_ranks(self) -> int:
        """Ranks the plan runs on (ranks 0..num_ranks-1); the global batch is cut into this many slices."""
        return self._fxpar.num_ranks

    @property
    def codegen(self) -> str:
        """``"inductor"`` or ``"eager"``: how the training step runs (eager also where Inductor fell back)."""
        return self._fxpar.main.step_fn.codegen

    @property
    def compile_s(self) -> float:
        """Seconds the code generator took on the training step's first call (0 for eager)."""
        return self._fxpar.main.step_fn.compile_s

    @property
    def state_dict_timeout_s(self) -> float:
        """How long ``state_dict()`` waits for every rank to join its gather before it raises
        ``RankFailedError`` (default 60 s)."""
        return self._fxpar.state_dict_timeout_s

    @state_dict_timeout_s.setter
    def state_dict_timeout_s(self, seconds: float) -> None:
        self._fxpar.state_dict_timeout_s = float(seconds)

    def train(self, mode: bool = True) -> FxparModule:
        super().train(mode)
        self._fxpar.source.training = mode
        return self

    # -- the step ----------------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        rt = self._fxpar
        self._check_inputs(inputs, kwargs)
        grad = torch.is_grad_enabled()
        amp = torch.get_autocast_dtype(rt.device.type) if torch.is_autocast_enabled(rt.device.type) else None
        shapes = None if grad else tuple(tuple(x.shape) for x in inputs)
        key = (self.training, grad, amp, shapes)
        variant = rt.variants.get(key)
        if variant is None:
            variant = rt.variants[key] = self._build(key, inputs)
        params = self._params()
        rest = self._states()
        # The variant holds autocast's casts already; the caller's autocast must not apply again.
        if grad:
            with torch.autocast(rt.device.type, enabled=False):
                return _Step.apply(self, variant, len(params), *params, *rest, *inputs)
        with torch.no_grad(), torch.autocast(rt.device.type, enabled=False):
            loss, _, updates = variant.run([p._local_tensor for p in params], [*rest, *inputs])
            self._apply_updates(variant, updates)
        return loss

    def _params(self) -> list[torch.Tensor]:
        """The trainable parameters (DTensors), in the graph's order."""
        return [module._parameters[attr] for module, attr in self._param_slots]

    def _states(self) -> list[torch.Tensor]:
        """This rank's frozen parameters and buffers, in the graph's order."""
        return [_local(_read(*slot)) for slot in self._state_slots.values()]

    def _step_inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors of the shapes and dtypes of this rank's step inputs (parameters, state, and
        ``inputs``' shapes), for the passes that read them before the first call."""
        return [*(p._local_tensor for p in self._params()), *self._states(),
                *[torch.empty(tuple(x.shape), dtype=x.dtype, device=self._fxpar.device) for x in inputs]]

    def _apply_updates(self, variant: Variant, updates: Sequence[torch.Tensor]) -> None:
        for name, value in zip(variant.updated_buffers, updates):
            _read(*self._state_slots[name]).copy_(value)

    def _check_inputs(self, inputs: tuple, kwargs: dict) -> None:
        rt = self._fxpar
        if kwargs:
            raise StepInputError(
                f"the compiled step takes its inputs by position, in the order of example_inputs; got keyword "
                f"argument(s) {sorted(kwargs)}: call compiled(x, y, ...) as the model was planned"
            )
        if len(inputs) != len(rt.input_shapes):
            raise CaptureError(f"expected {len(rt.input_shapes)} inputs (as planned), got {len(inputs)}")
        grad = torch.is_grad_enabled()
        for i, (x, shape, dtype) in enumerate(zip(inputs, rt.input_shapes, rt.input_dtypes)):
            if not isinstance(x, torch.Tensor):
                raise StepInputError(f"input[{i}] is a {type(x).__name__}; the compiled step takes tensors")
            if x.dtype != dtype:
                raise StepInputError(
                    f"input[{i}] has dtype {x.dtype} but the step was planned for {dtype}; pass x.to({dtype})"
                )
            if x.device != rt.device:
                raise StepInputError(
                    f"input[{i}] is on {x.device} but this rank's step runs on {rt.device}; pass x.to('{rt.device}')"
                )
            whole = rt.input_placement == "replicate"
            if grad and tuple(x.shape) != shape and whole:
                raise ShardingError(
                    f"input[{i}] on this rank has shape {list(x.shape)} but the plan (input_placement='replicate') "
                    f"expects the whole global batch, {list(shape)}, on every rank; pass the same batch to every rank"
                )
            if grad and tuple(x.shape) != shape:
                raise ShardingError(
                    f"input[{i}] on this rank has shape {list(x.shape)} but the plan expects this rank's slice "
                    f"of the global batch, {list(shape)}; pass inputs[i].chunk({self.num_ranks})[rank] (the plan's "
                    f"{self.num_ranks} ranks)"
                )
            if not grad and (x.dim() == 0 or list(x.shape[1:]) != list(shape[1:])):
                what = "the whole of a batch" if whole else "this rank's slice of a batch"
                raise ShardingError(
                    f"input[{i}] on this rank has shape {list(x.shape)}; an evaluation call takes {what} "
                    f"shaped like the planned one, [N, {', '.join(map(str, shape[1:]))}]"
                )

    def _build(self, key: tuple, inputs: Sequence[torch.Tensor]) -> Variant:
        """Capture, plan (parameters pinned) and compile the variant ``key``: collective."""
        from fxpar.planner import capture_and_annotate, plan_graph

        rt = self._fxpar
        training, grad, amp, _ = key
        main = rt.main.plan
        n = rt.num_ranks if rt.input_placement == "shard" else 1
        global_inputs = [torch.empty((x.shape[0] * n, *x.shape[1:]), dtype=x.dtype, device="meta") for x in inputs]
        mode = "training" if training else "eval"
        what = f"building the {mode} step ({'with' if grad else 'without'} gradients{', autocast ' + str(amp) if amp else ''})"

        gm = together(rt.control, what, lambda: capture_and_annotate(rt.source, global_inputs, grad=grad, autocast_dtype=amp,
                                                                     input_placement=rt.input_placement,
                                                                     batch_norm=rt.batch_norm))
        force = {fqn: spec_str(spec) for fqn, spec in main.param_specs.items()}
        leader = rt.control.ranks[0]

        def solve():
            if rt.control.rank != leader:
                return None
            made, _ = plan_graph(gm, cluster=main.cluster, mesh_shape=main.mesh_shape, optimizer=main.optimizer, force=force)
            return made.to_json()

        text = together(rt.control, what, solve)
        plan = Plan.from_json(broadcast_text(rt.control, text, leader))
        variant = together(rt.control, what, lambda: build_variant(rt, key, gm, plan, self._step_inputs(inputs)))
        assert all(variant.plan.param_specs[k] == v for k, v in main.param_specs.items()), "parameters moved"
        return variant

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        """Full tensors under the model's own keys (tied parameters under each of their names).
        Gathering the shards is collective: every rank of the mesh must call it; a call on one rank
        alone fails after ``state_dict_timeout_s`` (60 s) naming the ranks that did not join."""
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        rt = self._fxpar
        if keep_vars:
            return out
        keys = [k for k, v in out.items() if k.startswith(prefix) and isinstance(v, DTensor)]
        if not keys:
            return out
        arrive(rt.control, "state_dict()", rt.state_dict_timeout_s)
        gathered: dict[tuple, torch.Tensor] = {}
        for k in keys:
            v = out[k]
            local = v.to_local()
            ident = (local.data_ptr(), tuple(local.shape), v.placements)
            if ident not in gathered:
                gathered[ident] = v.full_tensor()
            out[k] = gathered[ident]
        return out

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with parameters as this rank's DTensors (no communication), for
        ``torch.distributed.checkpoint``: ``dcp.save(compiled.sharded_state_dict(), checkpoint_id=d)``;
        ``dcp.load(sd := compiled.sharded_state_dict(), checkpoint_id=d)`` loads in place."""
        return nn.Module.state_dict(self)

    def _to_dtensors(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        """Load-state-dict pre-hook: a full tensor (or a DTensor of another layout) for a DTensor
        parameter becomes this rank's DTensor in the parameter's layout (each rank slices its own
        part of the full tensor: no communication)."""
        for name, p in self.named_parameters(remove_duplicate=False):
            key = prefix + name
            value = state_dict.get(key)
            if not isinstance(p, DTensor) or not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(p.shape):
                continue
            if isinstance(value, DTensor):
                if value.device_mesh == p.device_mesh and value.placements == p.placements:
                    continue
                value = value.full_tensor()
            value = value.detach().to(device=p.device, dtype=p.dtype)
            state_dict[key] = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)


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
