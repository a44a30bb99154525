"""The recompute pass: the recomputed graph computes the same step, in less memory, alone, under a
plan's sharding on simulated ranks, and trained by ``fxpar.compile`` on two gloo ranks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fxpar
from fxpar.cost import CostModel
from fxpar.errors import PlanMismatchError
from fxpar.models import GPT, MLP, GPTConfig
from fxpar.passes.recompute import apply_recompute, recompute_nodes
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.runtime.memory import LiveTensorBytes
from fxpar.runtime.simulate import simulate_plan
from fxpar.solve.ilp import build_problem, min_memory
from fxpar.solve.recompute import analyze
from fxpar.solve.strategies import all_strategies


def _run(gm, params, buffers, inputs, seed=1):
    torch.manual_seed(seed)  # dropout draws the same masks in both runs
    with LiveTensorBytes(resident=params + buffers + inputs) as tracker:
        out = gm(params, buffers, inputs)
    return out, tracker.peak


def test_recomputing_every_candidate_gives_the_same_step_in_less_memory():
    """A GPT with dropout (never recomputed: its masks are reused) and attention, every op the ILP
    could recompute recomputed: the outputs are equal bit for bit and the measured peak drops."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64, dropout=0.1))
    inputs = list(model.example_inputs(4))
    gm = capture_and_annotate(model, inputs)
    params = [p.detach() for p in model.parameters()]
    buffers = [b.detach() for b in model.buffers()]
    decisions = analyze(gm).decisions
    assert any("dropout" not in str(d.target) for d in decisions)
    new, _ = recompute_nodes(gm, [d.name for d in decisions])
    new.graph.lint()
    copies = [n for n in new.graph.nodes if "fxpar_recomputed_from" in n.meta]
    assert copies and all("dropout" not in str(n.target) for n in copies)
    ref, ref_peak = _run(gm, params, buffers, inputs)
    out, peak = _run(new, params, buffers, inputs)
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    assert peak < 0.8 * ref_peak


def test_copies_sit_at_the_first_backward_use_and_forward_values_die_early():
    torch.manual_seed(0)
    model = MLP((16, 32, 32, 8))
    gm = capture_and_annotate(model, model.example_inputs(8))
    a = analyze(gm)
    relus = [d for d in a.decisions if d.target == torch.ops.aten.relu.default]
    new, _ = recompute_nodes(gm, [d.name for d in relus])
    order = {n: i for i, n in enumerate(new.graph.nodes)}
    loss_pos = order[new.graph.output_node().args[0][0]]
    for n in new.graph.nodes:
        if n.meta.get("fxpar_recomputed_from") in {d.name for d in relus}:
            original = next(m for m in new.graph.nodes if m.name == n.meta["fxpar_recomputed_from"])
            # Every use of the original is in the forward; the backward reads the copy.
            assert all(order[u] <= loss_pos for u in original.users)
            assert all(order[u] > loss_pos for u in n.users) and order[n] > loss_pos
            assert order[n] == min(order[u] for u in n.users) - 1 or any(
                "fxpar_recomputed_from" in u.meta for u in n.users
            )


def test_a_plan_that_recomputes_gives_the_same_step_on_simulated_ranks():
    torch.manual_seed(0)
    model = MLP((32, 64, 64, 64, 10))
    inputs = list(model.example_inputs(1024))
    gm = capture_and_annotate(model, inputs)
    cluster = fxpar.preset("cpu-local")
    problem = build_problem(gm, all_strategies(gm, (2,)), CostModel(cluster, (2,)))
    low, high = min_memory(problem, recompute=True), min_memory(problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, _ = plan_graph(gm, cluster=cluster.with_memory((low + high) / 2), mesh_shape=(2,))
    assert plan.recompute
    plan = fxpar.Plan.from_json(plan.to_json())
    assignment = plan.assignment(gm)
    new, new_assignment = apply_recompute(gm, plan, assignment)
    assert set(new_assignment) == {n for n in new.graph.nodes if n.op != "output"}
    params = [p.detach() for p in model.parameters()]
    flat = params + inputs
    kept = simulate_plan(gm, assignment, (2,), flat)
    recomputed = simulate_plan(new, new_assignment, (2,), flat)
    ref = gm(params, [], inputs)
    for rank_kept, rank_recomputed in zip(kept, recomputed):
        for a, b in zip(rank_recomputed, rank_kept):
            assert torch.equal(a, b)
        torch.testing.assert_close(rank_recomputed[0], ref[0], rtol=1e-5, atol=1e-6)


def test_a_plan_naming_an_op_that_cannot_be_recomputed_is_refused():
    torch.manual_seed(0)
    model = MLP((16, 32, 8))
    gm = capture_and_annotate(model, model.example_inputs(8))
    with pytest.raises(PlanMismatchError, match="recomputes %p"):
        recompute_nodes(gm, [next(n.name for n in gm.graph.nodes if n.op == "placeholder")])
    assert apply_recompute(gm, type("P", (), {"recompute": []})(), {}) == (gm, {})


# -- fxpar.compile on two gloo ranks -------------------------------------------------------------

DIMS, BATCH = (32, 64, 64, 64, 10), 512


def _mlp_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, DIMS[0], generator=g), torch.randint(0, DIMS[-1], (BATCH,), generator=g)


def _tight_cluster() -> fxpar.Cluster:
    torch.manual_seed(0)
    model = MLP(DIMS)
    gm = capture_and_annotate(model, _mlp_batch(0))
    cluster = fxpar.preset("cpu-local", num_devices=2)
    problem = build_problem(gm, all_strategies(gm, (2,)), CostModel(cluster, (2,)))
    return cluster.with_memory((min_memory(problem, recompute=True) + min_memory(problem)) / 2)


def train_recomputing(rank: int, cluster, steps: int):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = MLP(DIMS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = fxpar.compile(model, _mlp_batch(0), cluster=cluster, codegen="eager")
    world = dist.get_world_size()
    opt = torch.optim.SGD(step.parameters(), lr=0.05)
    losses = []
    for i in range(steps):
        x, y = _mlp_batch(i)
        loss = step(x.chunk(world)[rank], y.chunk(world)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return step.plan.recompute, losses


def test_compile_trains_a_plan_that_recomputes_as_one_process_does():
    cluster = _tight_cluster()
    steps = 3
    results = fxpar.launch(train_recomputing, 2, cluster, steps)
    torch.manual_seed(0)
    model = MLP(DIMS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = []
    for i in range(steps):
        loss = model(*_mlp_batch(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(loss.item())
    for recompute, losses in results:
        assert recompute  # the plan recomputes: without it the model does not fit
        assert losses == pytest.approx(ref, rel=1e-5)
    assert math.isfinite(ref[-1])
