"""Gradient synchronization is priced per bucket, as the runtime runs it (one collective per
bucket of gradients): each gradient pays its transfer and its copy into the bucket, and the
bucket's fixed cost (latency and launch) is shared, not paid once per gradient."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.cost import collective_time
from fxpar.models import MLP
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.solve.problem import GRAD_BUCKET_BYTES, GradValue

from ..runtime.train_fns import rank0_inputs


def _dp_plan(dims=(64, 128, 128, 10), batch: int = 64, preset: str = "cpu-local"):
    """(graph, plan, problem, choice) of the MLP ``dims`` with every parameter replicated."""
    torch.manual_seed(0)
    model = MLP(dims)
    gm = capture_and_annotate(model, model.example_inputs(batch))
    force = {f: "R" for f, _ in model.named_parameters()}
    plan, problem = plan_graph(gm, cluster=fxpar.preset(preset, num_devices=2), mesh_shape=(2,), force=force)
    choice = {n: problem.strategies[n].index(plan.strategies[n.name]) for n in problem.nodes}
    return gm, plan, problem, choice


def _dp_problem():
    return _dp_plan()[2:]


def test_a_gradient_pays_its_share_of_one_bucket_latency():
    problem, choice = _dp_problem()
    syncs = [e for e in problem.edges if e.position == -1]
    assert syncs and all(isinstance(e.tensor, GradValue) for e in syncs)
    cm = problem.cost_model
    bandwidth, latency = cm.links[0].figures("all_reduce")
    fixed = collective_time("all_reduce", 0.0, 2, bandwidth, latency) + cm.cluster.device.kernel_overhead_s
    total = 0.0
    for e in syncs:
        a, b = e.out_specs[choice[e.producer]], e.in_specs[choice[e.consumer]]
        if not problem.overlappable(e, a, b):
            continue
        nbytes = e.tensor.numel() * e.tensor.element_size()
        alone = cm.reshard_time(e.tensor.value, a, b)
        bucketed = problem.reshard_cost(e.tensor, a, b)
        assert bucketed == problem.grad_sync_cost(e.tensor, a, b)
        share = max(nbytes / GRAD_BUCKET_BYTES, 1 / problem.num_grad_syncs)
        # Alone, a gradient pays the whole latency; in a bucket, its share of it.
        assert bucketed - share * fixed == pytest.approx(
            alone - fixed + cm.roofline(0.0, 2 * nbytes, "elementwise") - cm.cluster.device.kernel_overhead_s, rel=1e-9)
        total += share * fixed
    # These small gradients fill one partial bucket: one latency in all.
    assert total == pytest.approx(fixed * sum(1 for e in syncs if problem.overlappable(
        e, e.out_specs[choice[e.producer]], e.in_specs[choice[e.consumer]])) / problem.num_grad_syncs)
    assert problem.breakdown(choice)["grad_sync"] < sum(
        cm.reshard_time(e.tensor.value, e.out_specs[choice[e.producer]], e.in_specs[choice[e.consumer]]) for e in syncs)


def test_a_partial_loss_is_priced_as_a_member_of_the_gradient_bucket():
    problem, _ = _dp_problem()
    cm = problem.cost_model
    loss = next(iter(problem.nodes[-1].graph.output_node().args[0]))
    strategies = problem.strategies[loss]
    partial = [k for k, s in enumerate(strategies) if repr(s.outputs[0][0]) == "P"]
    whole = [k for k, s in enumerate(strategies) if repr(s.outputs[0][0]) == "R"
             and all(repr(a[0]) == "R" for a in s.inputs)]
    assert partial and whole
    val = loss.meta["val"]
    share = problem.grad_sync_cost(GradValue(val), strategies[partial[0]].outputs[0], strategies[whole[0]].outputs[0])
    # A scalar's division costs the same on any strategy: the difference is the loss's all-reduce,
    # priced as a bucket member, not as a collective of its own.
    assert problem.node_cost[loss][partial[0]] - problem.node_cost[loss][whole[0]] == pytest.approx(share, rel=1e-9)
    assert share < cm.reshard_time(val, strategies[partial[0]].outputs[0], strategies[whole[0]].outputs[0])


def test_the_last_bucket_is_the_one_the_runtime_issues_last_and_only_the_others_hide():
    # 72 MB of gradients, every one all-reduced: buckets of the backward's last layer's (4 MB), the
    # middle weight's alone (64 MB, over the 25 MB cap), and the first layer's with the loss.
    from fxpar.passes.rewrite import rewrite
    from fxpar.runtime import codegen
    from fxpar.runtime.simulate import fake_world

    gm, plan, problem, choice = _dp_plan((256, 4096, 4096, 256), 2048, "a100-nvlink-8")
    syncs = [e for e in problem.edges if e.position == -1]
    assert all(problem.overlappable(e, e.out_specs[choice[e.producer]], e.in_specs[choice[e.consumer]]) for e in syncs)
    inputs = rank0_inputs(gm, plan.assignment(gm), (2,))
    with fake_world((2,)) as names:
        local = rewrite(gm, plan.assignment(gm), (2,), group_names=names)
        codegen.bucket_collectives(local, inputs)
    reduces = [n for n in local.graph.nodes if n.target is torch.ops._c10d_functional.all_reduce.default]
    assert len(reduces) == 3
    loss = next(iter(gm.graph.output_node().args[0]))
    partial_loss = repr(plan.strategies[loss.name].outputs[0][0]) == "P"
    # The model's last bucket holds what the runtime's last all-reduce carries (and the loss).
    last_issued = max(reduces, key=list(local.graph.nodes).index)
    assert last_issued.args[0].meta["val"].numel() == sum(e.tensor.numel() for e in problem.last_grads) + partial_loss
    parts = problem.breakdown(choice)
    last = sum(problem.reshard_cost(e.tensor, e.out_specs[choice[e.producer]], e.in_specs[choice[e.consumer]])
               for e in problem.last_grads)
    assert 0 < last < parts["grad_sync"]
    assert parts["exposed_grad_sync"] == pytest.approx(max(parts["grad_sync"] - parts["window"], last), rel=1e-12)
    assert parts["exposed_grad_sync"] < parts["grad_sync"]
