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
from fxpar.launch import launch
from fxpar.runtime.codegen import cpp_compiler
from fxpar.runtime.simulate import run_plan_rank, simulate_plan
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


def _cases(op, tensors, fn, mesh):
    """The sample's graph and, for every strategy the rule allows, an assignment that shards the
    tested op by it and keeps the helper ops around it replicated; with the graph's output specs."""
    gm = _graph(fn, tensors)
    targets = [n for n in gm.graph.nodes if n.target == op]
    assert targets, f"the sample for {op} does not call it"
    node = targets[0]
    others = [n for n in gm.graph.nodes if n.op == "call_function" and n is not node]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    rep = replicated(len(mesh))
    strategies = node_strategies(node, mesh)
    assert strategies
    cases = []
    for strategy in strategies:
        assignment: dict = {n: OpStrategy((), (rep,)) for n in placeholders}
        # Helper ops around the tested one stay replicated, so only the tested rule shards.
        for n in others:
            n_ins = len(tensor_arg_nodes(n))
            assignment[n] = OpStrategy((rep,) * n_ins, (rep,) * len(n.meta["val"] if isinstance(n.meta["val"], tuple) else [0]))
        assignment[node] = strategy
        cases.append((strategy, assignment))
    return gm, cases, [rep] * len(gm.graph.output_node().args[0])


def _check(op, strategy, results, expected):
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    for rank, got in enumerate(results):
        for g, e in zip(got, expected, strict=True):
            if op in UNDEFINED_VALUES:
                # Uninitialized memory: only the shape and dtype are defined.
                assert (g.shape, g.dtype) == (e.shape, e.dtype), f"{op} {strategy} rank {rank}"
            elif g.dtype.is_floating_point:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{op} {strategy} rank {rank}: {m}")
            else:
                assert torch.equal(g, e), f"{op} {strategy} rank {rank}"


@pytest.mark.parametrize("mesh", MESHES, ids=str)
@pytest.mark.parametrize("op, tensors, fn", SAMPLES, ids=[str(s[0]) for s in SAMPLES])
def test_rule_strategies_compute_the_unsharded_op(op, tensors, fn, mesh):
    gm, cases, output_specs = _cases(op, tensors, fn, mesh)
    for strategy, assignment in cases:
        results = simulate_plan(gm, assignment, mesh, tensors, output_specs=output_specs)
        _check(op, strategy.label(), results, fn(*tensors))


# Representative rules whose every strategy also runs compiled by Inductor on real gloo ranks: a
# matmul (partial sums), batch norm (statistics combined over the ranks), layer norm, softmax and an
# embedding (a split vocabulary). Each strategy compiles for about a second, so a few, not all.
COMPILED = ("aten.mm.default", "aten._native_batch_norm_legit_functional.default", "aten.native_layer_norm.default",
            "aten._softmax.default", "aten.embedding.default")


def compiled_rules_rank(rank: int, names: tuple[str, ...], mesh: tuple[int, ...], codegen: str) -> dict:
    """On one gloo rank: the outputs of every strategy of the first sample of each op in ``names``,
    run by ``codegen``, by (op, strategy label)."""
    out = {}
    for op, tensors, fn in samples():
        if str(op) not in names or any(k[0] == str(op) for k in out):
            continue
        gm, cases, output_specs = _cases(op, tensors, fn, mesh)
        for strategy, assignment in cases:
            out[(str(op), strategy.label())] = run_plan_rank(gm, assignment, mesh, tensors, output_specs=output_specs,
                                                             codegen=codegen)
    return out


@pytest.mark.skipif(cpp_compiler() is None, reason="Inductor on CPU needs a C++ compiler")
def test_rule_strategies_compiled_by_inductor_compute_the_unsharded_op():
    mesh = (2,)
    results = launch(compiled_rules_rank, 2, COMPILED, mesh, "inductor", timeout_s=300)
    checked = set()
    for op, tensors, fn in SAMPLES:
        if str(op) not in COMPILED or str(op) in {k[0] for k in checked}:
            continue
        for strategy, _ in _cases(op, tensors, fn, mesh)[1]:
            key = (str(op), strategy.label())
            _check(op, key[1], [r[key] for r in results], fn(*tensors))
            checked.add(key)
    assert {k[0] for k in checked} == set(COMPILED)
    assert set(results[0]) == checked
