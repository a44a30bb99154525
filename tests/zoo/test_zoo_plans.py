"""Third-party models plan as they are written: functional capture of their in-place ops, views
and constants, a rule for every op they use (fxpar's own or DTensor's), an optimal solve, and no
fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxpar
from fxpar.errors import FallbackWarning
from fxpar.planner import capture_and_annotate

from ..rules.samples import samples
from . import zoo_fns as Z

pytest.importorskip("transformers")

MESHES = [(2,), (2, 2)]


@pytest.fixture(scope="module")
def zoo_graphs():
    """Each model with its config's default dropout (GPT-2, BERT, T5 and ViT drop out at 0.1)."""
    return {name: capture_and_annotate(Z.make_model(name, dropout=None), Z.batch(name, 0)) for name in Z.MODELS}


@pytest.mark.parametrize("mesh", MESHES, ids=str)
@pytest.mark.parametrize("name", list(Z.MODELS))
def test_zoo_model_plans_optimally_without_fallback(name, mesh):
    model = Z.make_model(name, dropout=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fxpar.plan(model, Z.batch(name, 0), mesh_shape=mesh)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert not fallbacks, fallbacks
    assert plan.solver["status"] == "optimal", plan.solver
    assert plan.solver["gap"] <= 1e-9
    sources = {row.get("source") for row in plan.rows if row.get("source")}
    assert "none" not in sources


def test_every_zoo_op_has_a_validation_sample(zoo_graphs):
    """Every op the zoo uses, whichever source its strategies come from, is run sharded against
    the unsharded op by tests/rules/test_rules.py."""
    covered = {op for op, _, _ in samples()}
    used = {n.target for gm in zoo_graphs.values() for n in gm.graph.nodes if n.op == "call_function"}
    missing = sorted(str(op) for op in used - covered)
    assert not missing, f"ops of the zoo without a validation sample: {missing}"


def test_zoo_uses_dtensor_derived_strategies(zoo_graphs):
    """The zoo's rotary embeddings, padding and masks take DTensor's strategies: the adapter is on
    the path these models plan through, not only in unit tests."""
    from fxpar.rules.registry import op_facts

    used = {n.target for gm in zoo_graphs.values() for n in gm.graph.nodes if n.op == "call_function"}
    derived = {str(op) for op in used if op_facts(op).source == "dtensor"}
    assert {"aten.cos.default", "aten.constant_pad_nd.default", "aten._safe_softmax.default"} <= derived


def test_dropout_at_its_default_plans_cut(zoo_graphs):
    """GPT-2's default dropout is captured (its in-place bernoulli_ functionalized) and each draw is
    only ever cut, never replicated, in the plan."""
    gm = zoo_graphs["gpt2"]
    draws = [n for n in gm.graph.nodes if n.target is torch.ops.aten.bernoulli.p]
    assert draws
    plan = fxpar.plan(Z.make_model("gpt2", dropout=None), Z.batch("gpt2", 0), mesh_shape=(2,))
    for node in draws:
        spec = plan.strategies[node.name].outputs[0]
        assert all(type(p).__name__ == "Shard" for p in spec), (node.name, spec)
