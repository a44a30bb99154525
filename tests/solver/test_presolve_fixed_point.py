"""The presolve's infeasible-strategy reduction reaches its fixed point on every no-reshard edge,
also where repeated layers give many edges the same classes and specs (which it propagates once):
on the reduced problem the specs the kept strategies of one side of such an edge give are the
specs the other side's kept strategies want."""

from __future__ import annotations

import math

import pytest
import torch

import fxpar
from fxpar.cost import CostModel
from fxpar.models import GPT, GPTConfig, Llama, LlamaConfig
from fxpar.planner import capture_and_annotate
from fxpar.solve.presolve import presolve
from fxpar.solve.problem import build_problem
from fxpar.solve.strategies import all_strategies


def _problem(model, mesh):
    gm = capture_and_annotate(model, model.example_inputs(8))
    cluster = fxpar.preset("a100-nvlink-8", num_devices=math.prod(mesh))
    return build_problem(gm, all_strategies(gm, mesh), CostModel(cluster, mesh))


@pytest.mark.parametrize("make,mesh", [
    (lambda: GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=4, n_head=4, d_model=32, dropout=0.0)), (2, 2)),
    (lambda: Llama(LlamaConfig(vocab_size=64, seq_len=8, n_layer=4, n_head=4, n_kv_head=2, d_model=32,
                               ffn_hidden=64)), (2, 4)),
])
def test_every_no_reshard_edge_is_at_its_fixed_point(make, mesh):
    torch.manual_seed(0)
    p = _problem(make(), mesh)
    reduction = presolve(p)
    keep = reduction.keep
    edges = [e for e in p.no_reshard
             if len(set(e.out_specs)) > 1 and len(set(e.in_specs)) > 1
             and reduction.problem.rep(e.producer) is not reduction.problem.rep(e.consumer)]
    # Repeated layers: some classes and specs recur on many edges, the case propagated once.
    keys = [(reduction.problem.rep(e.producer), reduction.problem.rep(e.consumer), e.out_index, e.position) for e in edges]
    assert len(set(keys)) < len(keys)
    assert reduction.removed["infeasible"] > 0
    for e in edges:
        given = {e.out_specs[k] for k in keep[e.producer]}
        wanted = {e.in_specs[k] for k in keep[e.consumer]}
        assert given == wanted, (e.producer, e.consumer)
