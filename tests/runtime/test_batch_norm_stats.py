"""Batch norm over a batch cut between devices, per-device statistics (``batch_norm="local"``,
DDP's semantics): every rank's step equals the average of single-device steps on the ranks'
slices (loss, gradients, running statistics), no collective sits inside the layer, and the
weight, bias and running-statistics sums join the gradient bucket."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxpar
from fxpar.passes.capture import step_outputs
from fxpar.passes.rewrite import rewrite
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.rules import norm
from fxpar.runtime import codegen
from fxpar.runtime.simulate import fake_world, simulate_plan
from fxpar.solve.strategies import node_strategies

from .train_fns import rank0_inputs

funcol = torch.ops._c10d_functional
aten = torch.ops.aten


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x, y):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return nn.functional.cross_entropy(self.fc(x.mean((2, 3))), y)


def _setup():
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    gm = capture_and_annotate(model, (x, y))
    force = {f: "R" for f, _ in model.named_parameters()}
    plan, _ = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8", num_devices=2), mesh_shape=(2,), force=force)
    assignment = plan.assignment(gm)
    bn = [n for n in gm.graph.nodes if n.target is aten._native_batch_norm_legit_functional.default]
    assert len(bn) == 2 and all(repr(assignment[n].inputs[0][0]) == "S(0)" for n in bn), "the batch norms cut the batch"
    return model, (x, y), gm, assignment


def test_local_statistics_give_the_average_of_per_device_steps():
    model, (x, y), gm, assignment = _setup()
    params = [p.detach() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    results = simulate_plan(gm, assignment, (2,), params + buffers + [x, y], batch_norm="local")
    # The reference: DDP's computation, one eager step per slice, averaged.
    losses, grads, stats = [], [], []
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        replica = TinyCNN()
        replica.load_state_dict(model.state_dict())
        loss = replica(xs, ys)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in replica.parameters()])
        stats.append([b.detach() for b in replica.buffers()])
    _, grad_outs, buffer_outs = step_outputs(gm)
    assert len(grad_outs) == len(params) and len(buffer_outs) == 6  # 2 x (mean, var, num_batches_tracked)
    names = [n for n, _ in model.named_buffers()]
    for rank, (loss, *outs) in enumerate(results):
        torch.testing.assert_close(loss, (losses[0] + losses[1]) / 2, rtol=1e-5, atol=1e-6)
        for i in range(len(params)):
            torch.testing.assert_close(outs[i], (grads[0][i] + grads[1][i]) / 2, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} grad {i}: {m}")
        for (kind, fqn), value in zip(buffer_outs and gm.meta["fxpar_outputs"][-len(buffer_outs):], outs[len(params):]):
            j = names.index(fqn)
            want = stats[0][j] if stats[0][j].dtype == torch.int64 else (stats[0][j] + stats[1][j]) / 2
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} buffer {fqn}: {m}")


def test_local_statistics_put_no_collective_in_the_layer_and_bucket_the_sums():
    model, (x, y), gm, assignment = _setup()
    with fake_world((2,)) as names:
        local = rewrite(gm, assignment, (2,), group_names=names, batch_norm="local")
        targets = [n.target for n in local.graph.nodes]
        assert norm.batch_norm_global_stats not in targets and norm.batch_norm_global_stats_backward not in targets
        codegen.bucket_collectives(local, rank0_inputs(gm, assignment, (2,)))
    reduces = [n for n in local.graph.nodes if n.target is funcol.all_reduce.default]
    # Gradients and running statistics: all-reduces issued after the backward, one bucket.
    assert len(reduces) == 1, [n.args[0] for n in reduces]


def test_unknown_batch_norm_option_is_refused():
    _, _, gm, assignment = _setup()
    with pytest.raises(fxpar.errors.PlanOptionError, match=r"batch_norm='sync' is not one of \['global', 'local'\]"):
        rewrite(gm, assignment, (2,), batch_norm="sync")


def test_local_statistics_warn_where_the_plan_runs_a_batch_norm_on_the_whole_batch():
    model, (x, y), gm, assignment = _setup()
    bn = [n for n in gm.graph.nodes if n.target is aten._native_batch_norm_legit_functional.default]
    whole = dict(assignment)
    # The first batch norm replicated: it sees the whole batch, so its statistics are the batch's.
    whole[bn[0]] = next(s for s in node_strategies(bn[0], (2,)) if all(repr(p[0]) == "R" for p in s.inputs))
    with pytest.warns(fxpar.errors.FallbackWarning, match=rf"batch_norm='local': the plan runs batch norm {bn[0].name} "
                      r"on the whole batch .* not each device's; pin a strategy that cuts the batch"):
        norm.local_stats_assignment(whole)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm.local_stats_assignment(assignment)  # every batch norm cut: no warning
