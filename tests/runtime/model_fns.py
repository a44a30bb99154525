"""Tiny configurations of the shipped models and rank functions for the real multi-process model
tests (importable, as spawn needs)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from torch.fx import GraphModule

import fxpar
from fxpar.cluster import DeviceSpec, LinkSpec
from fxpar.rules.registry import OpStrategy
from fxpar.solve.strategies import all_strategies
from fxpar.models import GPT, VGG16, AlexNet, GPTConfig, Llama, LlamaConfig, ResNet18

GLOBAL_BATCH = 8
NUM_STEPS = 3
# A small step keeps fp32 rounding (which differs between a sharded and a one-process step) from
# growing through batch norm over the steps into more than the tolerance.
LR = 0.01


def make_model(name: str) -> nn.Module:
    """The model called ``name``, small enough to train a few steps on CPU in well under a second."""
    if name == "alexnet":
        return AlexNet(num_classes=8, image_size=32, width=1 / 16, dropout=0.0)
    if name == "vgg16":
        return VGG16(num_classes=8, image_size=32, width=1 / 16, dropout=0.0)
    if name == "resnet18":
        return ResNet18(num_classes=8, image_size=32, width=1 / 16)
    if name == "gpt":
        return GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, d_model=32, dropout=0.0))
    if name == "llama":
        return Llama(LlamaConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64))
    raise KeyError(name)


MODELS = ["alexnet", "vgg16", "resnet18", "gpt", "llama"]

# Parameters pinned to tensor-parallel placements, so that the runs exercise model-parallel paths
# (column/row-parallel layers, channel-parallel convolutions and batch norm, vocab-parallel
# embeddings) and not only the data parallelism a small batch would get anyway.
FORCE_1D: dict[str, dict[str, str]] = {
    "alexnet": {"features.3.weight": "S(0)", "classifier.1.weight": "S(0)", "classifier.4.weight": "S(1)"},
    "vgg16": {"features.7.weight": "S(0)", "classifier.0.weight": "S(0)", "classifier.3.weight": "S(1)"},
    "resnet18": {"layer1.0.conv1.weight": "S(0)", "layer2.0.conv2.weight": "S(1)", "fc.weight": "S(0)"},
    "gpt": {"wte.weight": "S(0)", "blocks.0.fc.weight": "S(0)", "blocks.0.proj.weight": "S(1)",
            "blocks.1.attn.q_proj.weight": "S(0)", "blocks.1.attn.out_proj.weight": "S(1)"},
    "llama": {"embed.weight": "S(1)", "blocks.0.mlp.gate_proj.weight": "S(0)", "blocks.0.mlp.down_proj.weight": "S(1)",
              "blocks.1.attn.q_proj.weight": "S(0)", "blocks.1.attn.k_proj.weight": "S(0)", "lm_head.weight": "S(0)"},
}


def batch(name: str, step: int, model: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """The global batch of ``step``: the same on every process, different per step."""
    model = model or make_model(name)
    torch.manual_seed(1000 + step)
    return model.example_inputs(GLOBAL_BATCH)


def reference_training(name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = make_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for step in range(NUM_STEPS):
        loss = model(*batch(name, step, model))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_all(rank: int, jobs: dict[str, list[str]], codegen: str = "eager") -> dict[str, list[tuple | None]]:
    """``train_runs`` for every model of ``jobs`` (name -> plans as JSON), in one process group."""
    return {name: train_runs(rank, name, plans, codegen) for name, plans in jobs.items()}


def train_runs(rank: int, name: str, plans: list[str], codegen: str = "eager") -> list[tuple | None]:
    """Train ``name`` for NUM_STEPS under each plan (JSON) in turn, from the same initial model,
    its step run by ``codegen``; per plan, (losses, full state) on the ranks the plan uses, None on
    the idle ones."""
    results = []
    for text in plans:
        plan = fxpar.Plan.from_json(text)
        torch.manual_seed(0)
        model = make_model(name)
        compiled = fxpar.compile(model, batch(name, 0, model), plan=plan, codegen=codegen)
        if not compiled.is_active:
            results.append(None)
            dist.barrier()
            continue
        assert compiled.codegen == codegen, compiled.codegen
        k = compiled.num_ranks
        opt = torch.optim.SGD(compiled.parameters(), lr=LR, momentum=0.9)
        losses = []
        for step in range(NUM_STEPS):
            inputs = batch(name, step, model)
            loss = compiled(*(x.chunk(k)[rank] for x in inputs))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results.append((losses, compiled.state_dict()))
        dist.barrier()
    return results


def compute_bound_cluster(num_devices: int) -> fxpar.Cluster:
    """Slow devices on near-free links: the cheapest plan cuts as much work as it can, so the runs
    go through many sharded paths (batch, channel, head and vocabulary cuts) rather than the
    replicated plan that a tiny model gets on real CPU figures."""
    device = DeviceSpec("slow", peak_flops=1e6, memory_bytes=2**34, memory_bandwidth=1e7, kernel_overhead_s=0.0)
    return fxpar.Cluster("compute-bound", device, num_devices, (LinkSpec(bandwidth=1e12, latency=0.0),))


def compose_plans(gm: GraphModule, outer: fxpar.Plan, inner: fxpar.Plan) -> fxpar.Plan:
    """A plan for the mesh ``outer.mesh_shape + inner.mesh_shape`` (two 1-D plans): each node does
    on axis 0 what ``outer`` chose and on axis 1 what ``inner`` chose, e.g. data parallel across
    and tensor parallel within. Where that pair is not one of the node's strategies (a dim too
    short to cut twice), the node keeps ``inner``'s choice on axis 1 with any valid axis 0; the
    rewrite reshards between nodes whatever the choices. No cost is predicted for it."""
    mesh = (*outer.mesh_shape, *inner.mesh_shape)
    a, b = outer.assignment(gm), inner.assignment(gm)
    chosen = {}
    for node, options in all_strategies(gm, mesh).items():
        want = OpStrategy(tuple((x[0], y[0]) for x, y in zip(a[node].inputs, b[node].inputs)),
                          tuple((x[0], y[0]) for x, y in zip(a[node].outputs, b[node].outputs)))
        same_inner = [s for s in options if tuple(p[1] for p in s.outputs) == tuple(p[0] for p in b[node].outputs)
                      and tuple(p[1] for p in s.inputs) == tuple(p[0] for p in b[node].inputs)]
        chosen[node] = want if want in options else (same_inner or options)[0]
    params = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta["fxpar_role"] == "param"]
    nan = float("nan")
    return fxpar.Plan(
        mesh_shape=mesh, cluster=outer.cluster, strategies={n.name: s for n, s in chosen.items()},
        predicted_step_s=nan, compute_s=nan, comm_s=nan, memory_bytes=nan,
        param_specs={p.meta["fxpar_fqn"]: chosen[p].outputs[0] for p in params}, optimizer=outer.optimizer,
        solver={"status": f"composed: axis 0 from a {list(outer.mesh_shape)} plan, axis 1 from a {list(inner.mesh_shape)} plan"},
    )
