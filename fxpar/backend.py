"""``torch.compile(model, backend="fxpar")``: the same planning and rewrite behind dynamo.

Dynamo hands over its graph with the parameters lifted to inputs and this rank's slice of the
batch. fxpar plans the step for the global batch (the local batch times the world size), and the
compiled call runs the rank's part of the joint graph. Difference from ``fxpar.compile``: the
user's module keeps its full parameters, so every rank holds full parameters and gradients and
runs the optimizer on them redundantly; sharded parameter placements save compute and traffic in
the step but not optimizer memory, and their gradients are all-gathered back to full size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import GraphModule

from fxpar.errors import CaptureError, ClusterSpecError
from fxpar.placement import replicated
from fxpar.runtime.steps import reshard


class _DynamoGraph(nn.Module):
    """Dynamo's graph as a module: lifted parameters and buffers become its own state again."""

    def __init__(self, gm: GraphModule, example_inputs: list):
        super().__init__()
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.kinds: list[tuple[str, int]] = []
        num_params = num_buffers = num_inputs = 0
        for node, value in zip(placeholders, example_inputs):
            source = getattr(node.meta.get("grapharg"), "source", None)
            if isinstance(value, nn.Parameter):
                self.register_parameter(f"p{num_params}", value)
                self.kinds.append(("param", num_params))
                num_params += 1
            elif isinstance(value, torch.Tensor) and source is not None and "_buffers[" in source.name:
                self.register_buffer(f"b{num_buffers}", value)
                self.kinds.append(("buffer", num_buffers))
                num_buffers += 1
            elif isinstance(value, torch.Tensor):
                self.kinds.append(("input", num_inputs))
                num_inputs += 1
            else:
                raise CaptureError(
                    f"dynamo passed %{node.name} = {value!r}, not a tensor; the fxpar backend needs static "
                    "shapes: use torch.compile(model, backend='fxpar', dynamic=False)"
                )
        self.num_inputs = num_inputs

    def forward(self, *inputs):
        args = []
        for kind, i in self.kinds:
            args.append(getattr(self, f"p{i}") if kind == "param" else getattr(self, f"b{i}") if kind == "buffer" else inputs[i])
        out = self.gm(*args)
        if isinstance(out, (tuple, list)) and len(out) == 1:
            out = out[0]
        return out


class _FullParamStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compiled, updated_slots: list[int], num_rest: int, *args):
        runtime = compiled._fxpar
        num_params = len(runtime.param_names)
        full_params, rest = args[:num_params], args[num_params:]
        rep = replicated(len(compiled.plan.mesh_shape))
        specs = [compiled.plan.param_specs[name] for name in runtime.param_names]
        with torch.no_grad():
            shards = [reshard(p.detach(), rep, spec, compiled.mesh) for p, spec in zip(full_params, specs)]
            loss, grads, updates = runtime.main.run(shards, [r.detach() for r in rest])
            grads = [reshard(g, spec, rep, compiled.mesh) for g, spec in zip(grads, specs)]
            for slot, value in zip(updated_slots, updates):
                rest[slot].copy_(value)  # the user's own buffer (batch-norm statistics)
        ctx.num_rest = num_rest
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (None, None, None, *[g * grad_loss for g in ctx.saved_tensors], *([None] * ctx.num_rest))


def fxpar_backend(gm: GraphModule, example_inputs: list, options: dict | None = None):
    """The dynamo backend. ``options`` (``torch.compile(..., options={...})``) go to
    ``fxpar.compile``: ``cluster``, ``mesh_shape``, ``optimizer``, ``plan``, ``codegen``."""
    options = dict(options or {})
    from fxpar.api import compile as fxpar_compile, init_distributed

    init_distributed()
    world = dist.get_world_size()
    mesh = options.get("mesh_shape") or (options["plan"].mesh_shape if options.get("plan") else (world,))
    if math.prod(mesh) != world:
        raise ClusterSpecError(
            f"the fxpar backend runs every rank of the group ({world}), but mesh {list(mesh)} has "
            f"{math.prod(mesh)} devices; use a mesh over all ranks, or fxpar.compile to leave ranks idle"
        )
    module = _DynamoGraph(gm, list(example_inputs))
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, src=0)  # as DDP does: every rank starts from rank 0's values
    local_inputs = [x for (kind, _), x in zip(module.kinds, example_inputs) if kind == "input"]
    global_inputs = [torch.empty((x.shape[0] * world, *x.shape[1:]), dtype=x.dtype, device="meta") if x.dim() else x
                     for x in local_inputs]
    # fxpar traces and compiles with fake tensors of its own; dynamo's tracing context (and its fake
    # mode, which torch's passes would otherwise pick up) is left for the duration.
    with torch._guards.tracing(None):
        compiled = fxpar_compile(module, global_inputs, **options)
    runtime = compiled._fxpar
    # Where each buffer the step updates sits among the step's state inputs, found once.
    updated_slots = [runtime.state_names.index(name) for name in runtime.main.updated_buffers]
    param_slots = [i for kind, i in module.kinds if kind == "param"]
    assert param_slots == list(range(len(param_slots)))

    def run(*args):
        params = [a for (kind, _), a in zip(module.kinds, args) if kind == "param"]
        buffers = [a for (kind, _), a in zip(module.kinds, args) if kind == "buffer"]
        inputs = [a for (kind, _), a in zip(module.kinds, args) if kind == "input"]
        return (_FullParamStep.apply(compiled, updated_slots, len(buffers) + len(inputs), *params, *buffers, *inputs),)

    return run
