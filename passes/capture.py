"""Capture pass: record one training step as a joint forward+backward aten graph on fake tensors.

The model is traced functionally: ``step(params, buffers, inputs) -> (loss, *grads)`` with
``torch.func.functional_call`` and ``torch.autograd.grad`` under ``make_fx`` in fake mode, so neither
the model's memory nor its compute is needed (a model built on the ``meta`` device plans as well).

Writes ``node.meta``:
  ``fxpar_role``: ``"param"``, ``"buffer"`` or ``"input"`` on placeholders;
  ``fxpar_fqn``: the parameter or buffer name, or ``"input[i]"``;
and ``gm.meta["fxpar_outputs"]``: one ``("loss", None)``, then ``("grad", fqn)`` per parameter (none for a
forward-only capture),
then ``("buffer", fqn)`` per buffer the step updates in place (batch-norm running statistics), in
the order of the graph's output tuple; those in-place updates become out-of-place ops.

Before (the user's module)::

    def forward(self, x, y): return cross_entropy(self.fc(x), y)

After::

    %p_fc_weight, %p_fc_bias, %x, %y = placeholders
    %t = aten.t(%p_fc_weight); %addmm = aten.addmm(%p_fc_bias, %x, %t); ...; %div = aten.div(...)
    ... backward: aten.mm, aten.sum.dim_IntList ...
    return (%div, %grad_fc_weight, %grad_fc_bias)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import operator

import torch
from torch import nn
from torch._decomp import get_decompositions
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.utils import _pytree as pytree

from fxpar.errors import CaptureError

aten = torch.ops.aten

# Ops decomposed at capture because their primitives shard more freely than they do: a mean or an
# nll_loss over a sharded batch becomes a Partial sum over a count, which the rules handle exactly.
_DECOMPOSE = [
    aten.nll_loss_forward,
    aten.nll_loss_backward,
    aten.mean.default,
    aten.mean.dim,
    aten.linear,
]

# Ops that return their input unchanged in value; dropped from the joint graph.
_IDENTITY = {aten.detach.default, aten.alias.default, aten.lift_fresh_copy.default}


def _fake_like(mode: FakeTensorMode, t: torch.Tensor, *, requires_grad: bool = False) -> torch.Tensor:
    device = torch.device("cpu") if t.device.type == "meta" else t.device
    with mode:
        out = torch.empty(tuple(t.shape), dtype=t.dtype, device=device)
    if requires_grad:
        out.requires_grad_(True)
    return out


def _symbolic_batch(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        raise CaptureError("dynamic_batch needs every input to have a batch dim 0; got a scalar input")
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1))
    real = torch.empty(tuple(t.shape), dtype=t.dtype) if t.device.type == "meta" else t
    return mode.from_tensor(real, symbolic_context=ctx)


def capture(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = False,
    grad: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> GraphModule:
    """Trace ``model(*example_inputs)`` (which must return a scalar loss) and its gradients.

    The model is traced in the mode it is in (``model.training``: dropout, batch-norm statistics).
    With ``grad=False`` the graph is the forward pass only: ``step(...) -> (loss, *buffer updates)``
    with no gradient outputs (an evaluation or ``torch.no_grad()`` call). With ``autocast_dtype``
    the forward runs under ``torch.autocast(<device>, autocast_dtype)`` and the gradients are taken
    outside it, as in ``with autocast(): loss = model(x)`` then ``loss.backward()``; the graph holds
    the casts autocast made. With ``dynamic_batch``, dim 0 of every input is a symbol, so the
    graph's shapes (and the annotations of ``annotate``) are expressions of the batch size; such a
    graph is for analysis, and planning takes a static capture."""
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError(f"example_inputs must be a tuple or list of tensors, got {type(example_inputs).__name__}")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"example_inputs[{i}] is a {type(x).__name__}; fxpar takes tensors only")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise CaptureError("the model has no parameter that requires grad; there is nothing to train")
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    buffers = frozen + list(model.named_buffers())
    param_names = [n for n, _ in named]
    buffer_names = [n for n, _ in buffers]

    mode = FakeTensorMode(allow_non_fake_inputs=False, shape_env=ShapeEnv() if dynamic_batch else None)
    params = [_fake_like(mode, p, requires_grad=grad) for _, p in named]
    device_type = next(iter(model.parameters())).device.type
    device_type = "cpu" if device_type == "meta" else device_type
    bufs = [_fake_like(mode, b) for _, b in buffers]
    inputs = [_symbolic_batch(mode, x) if dynamic_batch else _fake_like(mode, x) for x in example_inputs]

    def step(params, bufs, inputs):
        state = {**dict(zip(param_names, params)), **dict(zip(buffer_names, bufs))}
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = _loss_of(torch.func.functional_call(model, state, tuple(inputs)))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.dtype.is_floating_point:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise CaptureError(
                f"the model must return a scalar floating-point loss, but returned {got}; "
                "wrap it so that forward() computes the loss (e.g. return F.cross_entropy(logits, y))"
            )
        if not grad:
            return (loss,)
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        return (loss, *grads)

    decompositions = get_decompositions(_DECOMPOSE)
    tracing_mode = "symbolic" if dynamic_batch else "fake"
    with torch.device("cpu"), torch.autocast(device_type, enabled=False), torch.set_grad_enabled(grad):
        # The decompositions apply below autograd, so the backward is the original ops' backward.
        joint = make_fx(step, decomposition_table=decompositions, tracing_mode=tracing_mode)(params, bufs, inputs)
        _prims_to_aten(joint)
        # A step without in-place ops is already functional; functionalization would re-trace
        # every node to the same graph (half of capture's time on a Llama-7B-sized model).
        gm = _functionalize(joint, tracing_mode) if _mutates(joint) else joint
    _drop_identities(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(params) + len(bufs) + len(inputs)
    roles = (
        [("param", n) for n in param_names]
        + [("buffer", n) for n in buffer_names]
        + [("input", f"input[{i}]") for i in range(len(inputs))]
    )
    for node, (role, fqn) in zip(placeholders, roles):
        node.meta["fxpar_role"] = role
        node.meta["fxpar_fqn"] = fqn
    gm.meta["fxpar_outputs"] = [("loss", None)] + ([("grad", n) for n in param_names] if grad else [])
    updated = _functionalize_buffer_updates(gm, [n for n in placeholders if n.meta["fxpar_role"] == "buffer"])
    if updated:
        output = gm.graph.output_node()
        output.args = (tuple(output.args[0]) + tuple(value for _, value in updated),)
        codegen = gm.graph._codegen
        if getattr(codegen, "pytree_info", None) is not None and codegen.pytree_info.out_spec is not None:
            num_outputs = len(output.args[0])
            codegen.pytree_info = codegen.pytree_info._replace(out_spec=pytree.tree_structure(tuple(range(num_outputs))))
        gm.meta["fxpar_outputs"] += [("buffer", buf.meta["fxpar_fqn"]) for buf, _ in updated]
    gm.graph.lint()
    gm.recompile()
    return gm


def step_outputs(gm: GraphModule) -> tuple[Node, list[tuple[Node, Node]], list[tuple[Node, Node]]]:
    """The loss node, (gradient, parameter placeholder) pairs and (new value, buffer placeholder)
    pairs of a captured step."""
    outs = list(gm.graph.output_node().args[0])
    by_fqn = {n.meta["fxpar_fqn"]: n for n in gm.graph.nodes if n.op == "placeholder"}
    grads, buffers = [], []
    for node, (kind, fqn) in zip(outs, gm.meta["fxpar_outputs"]):
        if kind == "grad":
            grads.append((node, by_fqn[fqn]))
        elif kind == "buffer":
            buffers.append((node, by_fqn[fqn]))
    return outs[0], grads, buffers


def _loss_of(out):
    """The loss of a model's output: a tensor, or the ``loss`` of a mapping or output object
    (Hugging Face models return a ``ModelOutput`` whose ``loss`` is set when labels are given)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else out


def _mutates(gm: GraphModule) -> bool:
    """Whether the graph writes into a tensor: an op whose schema says so (``bernoulli_``,
    ``add_``, ``copy_``), or batch norm in training mode with running statistics, which updates
    them in place without its schema declaring it."""
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target._schema.is_mutable or (target == aten.native_batch_norm.default and node.args[5]):
            return True
    return False


def _functionalize(joint: GraphModule, tracing_mode: str) -> GraphModule:
    """Re-trace the joint graph through torch's functionalization (``torch.func.functionalize``):
    in-place ops on intermediates and on views of them become out-of-place ops (dropout's
    ``bernoulli_`` becomes ``bernoulli``, ``x += y`` an ``add``, a write into a view a
    ``*_scatter``), and a mutated graph input becomes one ``copy_`` into it at the end, which
    ``_functionalize_buffer_updates`` turns into a new value. The joint graph is traced first,
    under autograd, and functionalized second, because torch's functionalization cannot wrap
    tensors that autograd is asked to differentiate inside it.
    Placeholders keep their names, and the graph its calling convention."""
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    values = [n.meta["val"] for n in placeholders]
    interpreter = torch.fx.Interpreter(joint)
    gm = make_fx(
        torch.func.functionalize(lambda *flat: interpreter.run(*flat), remove="mutations"),
        tracing_mode=tracing_mode,
    )(*values)
    for old, new in zip(placeholders, [n for n in gm.graph.nodes if n.op == "placeholder"]):
        new._rename(old.name)
    # Called as the joint step is: step(params, buffers, inputs) -> (loss, *grads).
    gm.graph._codegen = joint.graph._codegen
    gm.recompile()
    return gm


def _prims_to_aten(gm: GraphModule) -> None:
    """Replace the ``prims.broadcast_in_dim`` that decompositions (``mean``) leave with
    ``aten.view`` (and ``aten.expand`` where it broadcasts): the step is then an aten graph that
    any torch backend compiles (AOT autograd cannot functionalize a prim that returns an alias)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.prims.broadcast_in_dim.default:
            continue
        x, shape, dims = node.args
        shape = list(shape)
        view_shape = [1] * len(shape)
        for j, d in enumerate(dims):
            view_shape[d] = x.meta["val"].shape[j]
        with graph.inserting_before(node):
            new = graph.call_function(aten.view.default, (x, view_shape))
            new.meta["val"] = _fake_call(new.target, new.args, {})
            if view_shape != shape:
                new = graph.call_function(aten.expand.default, (new, shape))
                new.meta["val"] = _fake_call(new.target, new.args, {})
        new.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _fake_call(target, args, kwargs):
    val = lambda a: a.meta["val"] if isinstance(a, Node) else a  # noqa: E731
    return target(*torch.fx.node.map_arg(args, val), **torch.fx.node.map_arg(kwargs, val))


def _functionalize_buffer_updates(gm: GraphModule, buffers: list[Node]) -> list[tuple[Node, Node]]:
    """Turn in-place updates of buffers (batch-norm running statistics, counters) into new values:
    later reads see the new value, and each updated buffer's last value becomes a graph output.
    Returns (buffer placeholder, its final value) for the updated buffers, in graph order."""
    graph = gm.graph
    current = {b: b for b in buffers}
    owner = {b: b for b in buffers}
    order: list[Node] = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        node.args = torch.fx.node.map_arg(node.args, lambda a: current.get(a, a))
        node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: current.get(a, a))
        target = node.target
        # native_batch_norm's schema does not declare that training mode updates the running
        # statistics in place, so it is matched by name.
        is_bn_update = target == aten.native_batch_norm.default and node.args[5] and node.args[3] is not None
        if not is_bn_update and not (isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable):
            continue
        if is_bn_update:
            x, w, b, rm, rv, _, momentum, eps = node.args
            with graph.inserting_before(node):
                args = (x, w, b, rm, rv, True, momentum, eps)
                fn = graph.call_function(aten._native_batch_norm_legit_functional.default, args)
                fn.meta["val"] = _fake_call(fn.target, args, {})
                outs = []
                for i in range(5):
                    item = graph.call_function(operator.getitem, (fn, i))
                    item.meta["val"] = fn.meta["val"][i]
                    outs.append(item)
            for user in list(node.users):
                assert user.target is operator.getitem, user
                user.replace_all_uses_with(outs[user.args[1]])
                graph.erase_node(user)
            graph.erase_node(node)
            mutated = [(rm, outs[3]), (rv, outs[4])]
        elif (
            target is aten.copy_.default and node.args[0] in owner and _same_layout(node.args[0], node.args[1])
        ):
            # Functionalization writes a mutated input back with one copy_ at the end of the graph.
            node.replace_all_uses_with(node.args[1])
            mutated = [(node.args[0], node.args[1])]
            graph.erase_node(node)
        elif target.__name__.split(".")[0].endswith("_") and isinstance(node.args[0], Node) and node.args[0] in owner:
            functional = getattr(getattr(aten, target.__name__.split(".")[0][:-1]), target._overloadname)
            with graph.inserting_before(node):
                new = graph.call_function(functional, node.args, node.kwargs)
                new.meta["val"] = _fake_call(functional, node.args, node.kwargs)
            node.replace_all_uses_with(new)
            mutated = [(node.args[0], new)]
            graph.erase_node(node)
        else:
            dst = node.args[0] if node.args and isinstance(node.args[0], Node) else None
            what = f"{dst.meta.get('fxpar_fqn', dst.name)}" if dst is not None else "a tensor"
            raise CaptureError(
                f"%{node.name} ({target}) writes into {what} in place during the step; fxpar updates only "
                "module buffers inside the step (parameters are updated by the optimizer, inputs are each "
                "rank's slice of the batch): compute the new value out of place instead"
            )
        for old, new in mutated:
            buf = owner[old]
            current[buf] = new
            owner[new] = buf
            if buf not in order:
                order.append(buf)
    return [(buf, current[buf]) for buf in order]


def _same_layout(a: Node, b) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val") if isinstance(b, Node) else None
    return isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.dtype == vb.dtype


def _drop_identities(gm: GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _IDENTITY:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
