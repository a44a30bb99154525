"""Every registered rule, validated by running it sharded: for each strategy the rule allows, the
inputs are cut per the strategy, the op runs on every simulated rank, the output is brought back to
replicated, and it must equal the op on the unsharded inputs."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxpar.placement import replicated
from fxpar.rules import registered_ops
from fxpar.rules.registry import OpStrategy, tensor_arg_nodes
from fxpar.runtime.simulate import simulate_plan
from fxpar.solve.strategies import node_strategies

from .samples import UNDEFINED_VALUES, samples

SAMPLES = samples()
MESHES = [(2,), (2, 2)]


def test_every_registered_rule_has_a_sample():
    """Every op with a rule of fxpar's own; the ops the zoo models use, from any source, are
    covered by tests/zoo/test_zoo_plans.py::test_every_zoo_op_has_a_sample."""
    covered = {op for op, _, _ in SAMPLES}
    missing = [str(op) for op in registered_ops() if op not in covered]
    assert not missing, f"rules without a validation sample: {missing}"


def _graph(fn, tensors):
    gm = make_fx(lambda *ts: (fn(*ts),), tracing_mode="fake")(*tensors)
    # Outputs an op does not compute (None, per an output_mask) leave unused getitems without a
    # value; capture drops them the same way.
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            n.meta["fxpar_role"] = "buffer"
    return gm


@pytest.mark.parametrize("mesh", MESHES, ids=str)
@pytest.mark.parametrize("op, tensors, fn", SAMPLES, ids=[str(s[0]) for s in SAMPLES])
def test_rule_strategies_compute_the_unsharded_op(op, tensors, fn, mesh):
    gm = _graph(fn, tensors)
    expected = fn(*tensors)
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    targets = [n for n in gm.graph.nodes if n.target == op]
    assert targets, f"the sample for {op} does not call it"
    node = targets[0]
    others = [n for n in gm.graph.nodes if n.op == "call_function" and n is not node]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    rep = replicated(len(mesh))
    strategies = node_strategies(node, mesh)
    assert strategies
    for strategy in strategies:
        assignment: dict = {n: OpStrategy((), (rep,)) for n in placeholders}
        # Helper ops around the tested one stay replicated, so only the tested rule shards.
        for n in others:
            n_ins = len(tensor_arg_nodes(n))
            assignment[n] = OpStrategy((rep,) * n_ins, (rep,) * len(n.meta["val"] if isinstance(n.meta["val"], tuple) else [0]))
        assignment[node] = strategy
        outs = gm.graph.output_node().args[0]
        results = simulate_plan(gm, assignment, mesh, tensors, output_specs=[rep] * len(outs))
        for rank, got in enumerate(results):
            for g, e in zip(got, expected):
                if op in UNDEFINED_VALUES:
                    # Uninitialized memory: only the shape and dtype are defined.
                    assert (g.shape, g.dtype) == (e.shape, e.dtype), f"{op} {strategy.label()} rank {rank}"
                elif g.dtype.is_floating_point:
                    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{op} {strategy.label()} rank {rank}: {m}")
                else:
                    assert torch.equal(g, e), f"{op} {strategy.label()} rank {rank}"
