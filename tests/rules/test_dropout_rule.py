"""Dropout with p > 0 draws a random mask, so it cannot be compared with the unsharded op: the
rule may only cut the tensor (devices never draw two masks for one value), and every sharded run
must apply, element by element, exactly the mask it returns."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxpar.placement import Shard, replicated
from fxpar.rules.registry import OpStrategy
from fxpar.runtime.simulate import simulate_plan
from fxpar.solve.strategies import node_strategies

aten = torch.ops.aten


def _graph(p: float, train: bool):
    gm = make_fx(lambda x: aten.native_dropout(x, p, train), tracing_mode="fake")(torch.randn(8, 6))
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            n.meta["fxpar_role"] = "input"
    return gm, next(n for n in gm.graph.nodes if n.target is aten.native_dropout.default)


@pytest.mark.parametrize("mesh", [(2,), (2, 2)], ids=str)
def test_dropout_with_p_above_zero_is_only_ever_cut(mesh):
    _, node = _graph(0.5, True)
    strategies = node_strategies(node, mesh)
    assert strategies
    for s in strategies:
        assert all(isinstance(p, Shard) for p in s.inputs[0]), s.label()
    # Without dropping (p = 0 or eval) the op is the identity, so replication is allowed again.
    _, node = _graph(0.0, True)
    assert any(not isinstance(p, Shard) for s in node_strategies(node, mesh) for p in s.inputs[0])


@pytest.mark.parametrize("mesh", [(2,), (2, 2)], ids=str)
def test_sharded_dropout_applies_the_mask_it_returns(mesh):
    torch.manual_seed(0)
    gm, node = _graph(0.5, True)
    x = torch.randn(8, 6)
    rep = replicated(len(mesh))
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    getitems = [n for n in gm.graph.nodes if n.op == "call_function" and n is not node]
    for strategy in node_strategies(node, mesh):
        assignment = {placeholder: OpStrategy((), (rep,)), node: strategy}
        for g in getitems:
            assignment[g] = OpStrategy((strategy.outputs[g.args[1]],), (strategy.outputs[g.args[1]],))
        results = simulate_plan(gm, assignment, mesh, [x], output_specs=[rep, rep])
        for out, mask in results:
            assert mask.dtype == torch.bool
            torch.testing.assert_close(out, x * mask * 2.0)
            assert 0 < int(mask.sum()) < mask.numel()
        assert all(torch.equal(r[1], results[0][1]) for r in results), "the gathered mask differs between devices"
