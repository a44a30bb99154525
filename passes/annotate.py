"""Annotate pass: FLOPs, bytes and forward/backward role of every node.

Reads ``node.meta["val"]`` (fake tensors from capture). Counts are ints, or sympy expressions of
the symbol ``batch`` where capture made the batch symbolic. Writes ``node.meta``:
  ``fxpar_flops``: FLOPs as ``torch.utils.flop_counter`` counts them (matmuls, convolutions,
      attention; 0 for ops it does not count, whose time the cost model takes from bytes instead);
  ``fxpar_bytes_read`` / ``fxpar_bytes_written``: bytes of tensor inputs / outputs (0 for views);
  ``fxpar_output_bytes``: bytes of the node's outputs, even for views;
  ``fxpar_is_view``: the output aliases an input's storage (no copy, no memory of its own; the
      op's ``OpFacts.view``, torch's ``OpOverload.is_view`` unless its rule says otherwise);
  ``fxpar_phase``: ``"forward"`` if the loss depends on the node, else ``"backward"``;
  ``fxpar_saved_for_backward``: a forward node whose output a backward node reads.

Before: ``%mm = aten.mm(%x, %w)``; after: the same node with
``meta = {fxpar_flops: 2*m*k*n, fxpar_bytes_read: 4*(m*k+k*n), ..., fxpar_phase: "forward"}``.
"""

from __future__ import annotations

import sympy
import torch
from torch.fx import GraphModule, Node
from torch.utils.flop_counter import flop_registry

from fxpar.rules.registry import op_facts

aten = torch.ops.aten

BATCH = sympy.Symbol("batch", positive=True, integer=True)


def as_number(value) -> int | sympy.Expr:
    """An int, or for a symbolic size a sympy expression of ``batch`` (the inputs' dim 0)."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        if isinstance(expr, sympy.Integer):
            return int(expr)
        return expr.subs({s: BATCH for s in expr.free_symbols})
    return int(value)


def tensor_bytes(value) -> int | sympy.Expr:
    if isinstance(value, torch.Tensor):
        return as_number(value.numel()) * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, Node) else arg


def node_flops(node: Node) -> int | sympy.Expr:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet not in flop_registry:
        return 0
    args = torch.fx.node.map_arg(node.args, _val)
    kwargs = torch.fx.node.map_arg(node.kwargs, _val)
    return as_number(flop_registry[packet](*args, **kwargs, out_val=node.meta["val"]))


def annotate(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    output = graph.output_node()
    loss = output.args[0][0]
    forward: set[Node] = set()
    stack = [loss]
    while stack:
        node = stack.pop()
        if node in forward:
            continue
        forward.add(node)
        stack.extend(node.all_input_nodes)
    for node in graph.nodes:
        meta = node.meta
        if node.op == "output":
            continue
        out_bytes = tensor_bytes(meta.get("val"))
        meta["fxpar_output_bytes"] = out_bytes
        meta["fxpar_phase"] = "forward" if node in forward or node.op == "placeholder" else "backward"
        if node.op == "call_function":
            is_view = op_facts(node.target).view
            meta["fxpar_is_view"] = is_view
            meta["fxpar_flops"] = node_flops(node)
            meta["fxpar_bytes_read"] = 0 if is_view else sum(tensor_bytes(_val(a)) for a in node.all_input_nodes)
            meta["fxpar_bytes_written"] = 0 if is_view else out_bytes
        else:
            meta["fxpar_is_view"] = False
            meta["fxpar_flops"] = 0
            meta["fxpar_bytes_read"] = meta["fxpar_bytes_written"] = 0
    for node in graph.nodes:
        if node.op == "output":
            continue
        node.meta["fxpar_saved_for_backward"] = node.meta["fxpar_phase"] == "forward" and any(
            u.op != "output" and u.meta["fxpar_phase"] == "backward" for u in node.users
        )
    return gm
