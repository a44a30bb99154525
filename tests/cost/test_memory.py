"""The memory model against the measured peak of real training steps on 2 gloo ranks.

Each plan is compiled with ``codegen="eager"`` (the tracker, ``fxpar.runtime.memory.LiveTensorBytes``,
follows the ops that run one by one) and one training step (the call, the backward that hands the
gradients to the parameters, an Adam update, ``zero_grad``) is measured after a first step has
made the optimizer state (the least of six such steps): the rank's parameters, buffers, Adam state and batch slice (each storage
once), plus the peak of the storage the step's ops make. The plan's predicted peak per device must
lie within 10% of the larger rank's measurement (``tools/memory_fidelity.py`` runs the benchmark's
fifteen plans the same way).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fxpar
from fxpar.models import MLP, GPT, GPTConfig
from fxpar.plan import Plan
from fxpar.planner import capture_and_annotate, plan_graph
from fxpar.runtime.memory import measure_step

TOLERANCE = 0.10
MEASURED_STEPS = 6


def _mlp():
    return MLP((256, 512, 512, 10)), 128


def _gpt():
    return GPT(GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=4, d_model=64)), 8


class SplitPieces(nn.Module):
    """A projection split in three pieces (views of one storage), each read by the backward: the
    whole projection lives as long as any piece."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.d = d
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def example_inputs(self, batch: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.d),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.d, dim=-1)
        return (self.out(torch.tanh(q) * k) * v).sum()


def _split():
    return SplitPieces(), 512


MODELS = {"mlp": _mlp, "gpt": _gpt, "split": _split}
WEIGHTS = ("layers.0.weight", "layers.1.weight", "layers.2.weight")
CASES = [
    ("mlp", "data parallel", {w: "R" for w in WEIGHTS}),
    ("mlp", "zero-3", {**{w: "S(0)" for w in WEIGHTS}, "layers.0.bias": "S(0)", "layers.1.bias": "S(0)"}),
    ("mlp", "megatron", {"layers.0.weight": "S(0)", "layers.0.bias": "S(0)", "layers.1.weight": "S(1)"}),
    ("gpt", "fxpar", None),
    ("split", "fxpar", None),
]


def _build(name: str):
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    return model, tuple(model.example_inputs(batch))


def _measure(rank: int, plans: list[str]) -> list[int]:
    warnings.simplefilter("ignore")
    world = dist.get_world_size()
    out = []
    for (name, _, _), text in zip(CASES, plans):
        model, inputs = _build(name)
        compiled = fxpar.compile(model, inputs, plan=Plan.from_json(text), codegen="eager")
        params = list(compiled.parameters())
        opt = torch.optim.Adam(params, lr=1e-4)
        local = [t.chunk(world)[rank].contiguous() for t in inputs]

        def step(c=compiled, o=opt, x=local):
            c(*x).backward()
            o.step()
            o.zero_grad()

        step()
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        resident = params + list(compiled.buffers()) + state + local
        # The least of six steps: now and then one step's peak holds an extra ~2 MiB on the MLP,
        # freed later, not by the step's own references. On the GPT of test_recompute_e2e the
        # extra storage is a collective's input, held by gloo's work object until gloo's worker
        # thread releases it after the collective completes (docs/cost-model.md, Memory). On the
        # split projection it is one gradient shard (24 KiB) in 10-15% of steps on either rank
        # (3 x 200 steps per rank, measured with the runtime before and after its foreach
        # scaling alike), so three steps all held it in a CI run (-11.0% against the 10%).
        out.append(min(measure_step(step, resident)["peak"] for _ in range(MEASURED_STEPS)))
    return out


@pytest.fixture(scope="module")
def measured():
    plans = []
    for name, _, force in CASES:
        model, inputs = _build(name)
        gm = capture_and_annotate(model, inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plans.append(plan_graph(gm, cluster=fxpar.preset("cpu-local", num_devices=2), mesh_shape=(2,), force=force)[0])
    per_rank = fxpar.launch(_measure, 2, [p.to_json() for p in plans])
    return [(plan, max(ranks)) for plan, ranks in zip(plans, zip(*per_rank))]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{m}-{k}" for m, k, _ in CASES])
def test_predicted_peak_within_10_percent_of_measured(measured, index):
    plan, peak = measured[index]
    ratio = plan.memory_bytes / peak
    assert abs(ratio - 1) <= TOLERANCE, (
        f"{CASES[index][:2]}: predicted {plan.memory_bytes / 2**20:.3f} MiB, measured {peak / 2**20:.3f} MiB ({ratio - 1:+.1%})")


def test_zero3_plan_gathers_and_the_model_counts_it(measured):
    """The ZeRO-3 case shards every weight (so its gathered copies are what the model must place in
    time), and it needs less memory than data parallelism, as measured."""
    (dp, dp_peak), (zero, zero_peak) = measured[0], measured[1]
    assert all(spec_text != "R" for spec_text in (str(zero.param_specs[w][0]) for w in WEIGHTS))
    assert zero_peak < dp_peak and zero.memory_bytes < dp.memory_bytes
