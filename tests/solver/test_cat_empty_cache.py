"""A concatenation with a legacy 1-D empty tensor (an empty KV cache, as Hugging Face's
DynamicCache starts) can be cut like any other: torch.cat skips the empty tensor, so the rule keeps
it replicated and lets the other input and the output be sharded. Without this, every key and
value of a Hugging Face Llama was held whole on every device (its simplified problem did not fit
in memory)."""

from __future__ import annotations

import torch

from fxpar.placement import Shard
from fxpar.runtime.simulate import simulate_plan

from ..rules.test_rules import _cases, _check

aten = torch.ops.aten


def _sample():
    x = torch.randn(4, 2, 6, 4)
    return [torch.empty(0), x], lambda e, x: aten.cat([e, x], -2)


def test_cat_with_legacy_empty_tensor_shards_and_computes_the_unsharded_op():
    tensors, fn = _sample()
    for mesh in [(2,), (2, 2)]:
        gm, cases, output_specs = _cases(aten.cat.default, tensors, fn, mesh)
        cut = {p.dim for strategy, _ in cases for p in strategy.outputs[0] if isinstance(p, Shard)}
        assert cut == {0, 1, 3}  # every dim but the joined one (2); the empty input stays replicated
        for strategy, assignment in cases:
            assert all(not isinstance(p, Shard) for p in strategy.inputs[0])
            results = simulate_plan(gm, assignment, mesh, tensors, output_specs=output_specs)
            _check(aten.cat.default, strategy.label(), results, fn(*tensors))
