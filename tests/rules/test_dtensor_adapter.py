"""The adapter from torch's DTensor strategies (fxpar/rules/dtensor.py): what it converts, what it
drops, and that a strategy DTensor cannot give falls back loudly."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributed.tensor import Partial as DPartial
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor._ops.single_dim_strategy import _ShardingPlaceholder, _SingleDimStrategyInfo
from torch.distributed.tensor.placement_types import _StridedShard
from torch.fx.experimental.proxy_tensor import make_fx

from fxpar.errors import UnsupportedOpError
from fxpar.placement import P, R, Shard
from fxpar.rules.dtensor import _propagator, dtensor_has
from fxpar.rules.registry import op_facts
from fxpar.solve.strategies import node_strategies

aten = torch.ops.aten
OP = aten.erf.default  # no rule of fxpar's own; DTensor registers a pointwise strategy


def _node(x: torch.Tensor):
    gm = make_fx(lambda t: (aten.erf(t),), tracing_mode="fake")(x)
    return next(n for n in gm.graph.nodes if n.target is OP)


@pytest.fixture
def fake_strategy(monkeypatch):
    """Replace DTensor's single-dim strategy for ``OP`` by one returning the given rules."""
    table = _propagator().op_single_dim_strategy_funcs
    assert OP in table and op_facts(OP).source == "dtensor"

    def install(rules):
        monkeypatch.setitem(table, OP, _SingleDimStrategyInfo(func=lambda op, args, kwargs: rules))

    return install


def test_pointwise_op_takes_dtensor_strategies():
    strategies = node_strategies(_node(torch.randn(4, 6)), (2,))
    labels = {s.label() for s in strategies}
    assert {"R->R", "S(0)->S(0)", "S(1)->S(1)"} <= labels
    assert "P->P" not in labels  # erf is not linear


def test_placements_fxpar_does_not_model_drop_the_strategy(fake_strategy):
    fake_strategy([
        [_ShardingPlaceholder(1), _ShardingPlaceholder(1)],  # kept: S(1) -> S(1)
        [DPartial("sum"), DPartial("sum")],                  # kept: P -> P
        [DPartial("max"), DPartial("max")],                  # dropped: not a sum
        [_StridedShard(0, split_factor=2), DShard(0)],       # dropped: strided
        [DReplicate(), DShard(0)],                           # kept: S(0) -> R
    ])
    strategies = node_strategies(_node(torch.randn(4, 6)), (2,))
    got = {(s.inputs[0], s.outputs[0]) for s in strategies}
    assert got == {((R,), (R,)), ((Shard(1),), (Shard(1),)), ((P,), (P,)), ((Shard(0),), (R,))}


def test_a_strategy_dtensor_cannot_give_falls_back_with_a_warning(fake_strategy, monkeypatch):
    def refuse(op, args, kwargs):
        raise RuntimeError("no strategy for these arguments")

    monkeypatch.setitem(_propagator().op_single_dim_strategy_funcs, OP, _SingleDimStrategyInfo(func=refuse))
    node = _node(torch.randn(4, 6))
    assert [s.label() for s in node_strategies(node, (2,))] == ["R->R"]
    assert "no strategy for these arguments" in node.meta["fxpar_fallback_reason"]
    with pytest.raises(UnsupportedOpError, match=r"%erf \(aten.erf.default\) runs replicated: DTensor's strategy raised"):
        node_strategies(_node(torch.randn(4, 6)), (2,), strict=True)


def test_random_ops_are_not_taken_from_dtensor():
    """DTensor keeps replicas of a random op equal with its RNG tracker; per-rank graphs have none."""
    for op in (aten.rand_like.default, aten.randn_like.default, aten.bernoulli.default):
        assert not dtensor_has(op)
        assert op_facts(op).source == "none"
    assert op_facts(aten.bernoulli.p).source == "fxpar"


def test_facts_come_from_torch_tags():
    assert op_facts(aten.erf.default).cheap and op_facts(aten.erf.default).cost_class == "elementwise"
    assert op_facts(aten.amax.default).cost_class == "reduction"
    assert op_facts(aten.mm.default).cost_class == "matmul" and op_facts(aten.mm.default).source == "fxpar"
    assert op_facts(aten.diagonal.default).view


def test_plan_with_a_dtensor_op_has_no_fallback():
    from fxpar import plan
    from fxpar.errors import FallbackWarning

    class Erf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 6)

        def forward(self, x):
            return torch.erf(self.fc(x)).sum()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(Erf(), (torch.randn(8, 6),), mesh_shape=(2,))
    assert not [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert any(row.get("source") == "dtensor" and row["op"] == "erf" for row in p.rows)
    assert "strategies from torch's DTensor (no rule of fxpar's own): erf" in p.explain()
