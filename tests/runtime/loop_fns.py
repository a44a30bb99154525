"""Rank functions for the training-loop tests: clipping, optimizer groups by name, checkpoints,
evaluation, autocast, and ranks that fail or disagree (importable, as spawn needs)."""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

import fxpar
from fxpar.models import MLP

SHARDED = {"layers.0.weight": "S(0)", "layers.1.weight": "S(1)"}
OTHER_SHARDED = {"layers.0.weight": "S(1)", "layers.2.weight": "S(0)"}
CLIP = 0.2  # below the gradient norm of every step here, so clipping acts


def mlp(hidden: int = 64) -> MLP:
    return MLP((16, hidden, 32, 8))


def batch(step: int, size: int = 16):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(size, 16, generator=g), torch.randint(0, 8, (size,), generator=g)


def local(xs, rank: int, world: int):
    return [x.chunk(world)[rank] for x in xs]


def adamw_by_name(module: nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    """nanoGPT's groups: weight decay on matrices, none on biases (found by name)."""
    decay = [p for n, p in module.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in module.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def step(module, opt, xs, clip: float | None = 1.0, amp: torch.dtype | None = None):
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        loss = module(*xs)
    opt.zero_grad()
    loss.backward()
    norm = None
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    opt.step()
    return float(loss.detach()), norm


def full_state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def reference_loop(num_steps: int, clip: float | None = 1.0, amp=None, dtype=torch.float32):
    torch.manual_seed(0)
    model = mlp().to(dtype)
    opt = adamw_by_name(model)
    out = [step(model, opt, [x.to(dtype) if x.is_floating_point() else x for x in batch(i)], clip, amp) for i in range(num_steps)]
    return out, full_state(model)


def _compiled(force=None, codegen="eager", dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = mlp().to(dtype)
    example = [x.to(dtype) if x.is_floating_point() else x for x in batch(0)]
    plan = fxpar.plan(model, example, mesh_shape=(dist.get_world_size(),), force=force) if force else None
    return model, fxpar.compile(model, example, plan=plan, codegen=codegen)


def clip_and_groups(rank: int, num_steps: int, force):
    """Train with clipping and name-based groups on a sharded plan; report names, layouts, losses,
    norms and the full state (every rank's, to compare replicas)."""
    model, compiled = _compiled(force)
    world = dist.get_world_size()
    names = [n for n, _ in compiled.named_parameters()]
    layouts = {n: (type(p).__name__, [repr(pl) for pl in p.placements]) for n, p in compiled.named_parameters()}
    opt = adamw_by_name(compiled)
    out = [step(compiled, opt, local(batch(i), rank, world), clip=CLIP) for i in range(num_steps)]
    return {"names": names, "model_names": [n for n, _ in model.named_parameters()], "layouts": layouts,
            "steps": out, "state": full_state(compiled)}


def checkpoint_resume(rank: int, directory: str, force, other_force):
    """Two steps, a DCP checkpoint (model shards and optimizer state) and a full state dict, then a
    third step; resumed from the checkpoint on the same plan and on another plan."""
    world = dist.get_world_size()
    _, compiled = _compiled(force)
    opt = adamw_by_name(compiled)
    for i in range(2):
        step(compiled, opt, local(batch(i), rank, world))
    dcp.save({"model": compiled.sharded_state_dict(), "optim": get_optimizer_state_dict(compiled, opt)}, checkpoint_id=directory)
    full_after_two = full_state(compiled)
    wrapper = nn.Module()
    wrapper.inner = compiled
    wrapped_keys = sorted(wrapper.state_dict())
    third = step(compiled, opt, local(batch(2), rank, world))
    uninterrupted = full_state(compiled)

    resumed = {}
    for label, f in (("same", force), ("other", other_force)):
        _, again = _compiled(f, seed=1)  # other initial values: everything must come from the checkpoint
        opt2 = adamw_by_name(again)
        sd = {"model": again.sharded_state_dict(), "optim": get_optimizer_state_dict(again, opt2)}
        dcp.load(sd, checkpoint_id=directory)
        again.load_state_dict(sd["model"])
        set_optimizer_state_dict(again, opt2, sd["optim"])
        resumed[label] = (step(again, opt2, local(batch(2), rank, world)), full_state(again))

    _, fresh = _compiled(force, seed=2)
    wrapper2 = nn.Module()
    wrapper2.inner = fresh
    wrapper2.load_state_dict({f"inner.{k}": v for k, v in full_after_two.items()})
    return {"third": third, "uninterrupted": uninterrupted, "resumed": resumed, "full_after_two": full_after_two,
            "reloaded_full": full_state(fresh), "wrapped_keys": wrapped_keys}


class TiedLM(nn.Module):
    """An embedding whose weight is also the output head (as GPT-2 ties them)."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens, targets):
        logits = self.head(torch.tanh(self.mix(self.embed(tokens))))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def tokens(step: int):
    g = torch.Generator().manual_seed(300 + step)
    return torch.randint(0, 32, (8, 6), generator=g), torch.randint(0, 32, (8, 6), generator=g)


def tied_reference(num_steps: int):
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = [step(model, opt, tokens(i), clip=None) for i in range(num_steps)]
    return out, full_state(model)


def tied(rank: int, num_steps: int):
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = TiedLM()
    compiled = fxpar.compile(model, tokens(0), codegen="eager")
    all_names = [n for n, _ in compiled.named_parameters(remove_duplicate=False)]
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-2)
    out = [step(compiled, opt, local(tokens(i), rank, world), clip=None) for i in range(num_steps)]
    sd = full_state(compiled)
    fresh = TiedLM()
    fresh.load_state_dict(sd)  # strict: every key of the model is there
    return {"steps": out, "state": sd, "names": all_names,
            "still_tied": compiled.head.weight is compiled.embed.weight, "loaded_tied": fresh.head.weight is fresh.embed.weight}


class NormNet(nn.Module):
    """Conv, batch norm, dropout and a classifier: what eval mode changes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 8, 1)  # a convolution of batch norm's output (a dtype check under autocast)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.mix(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
        return F.cross_entropy(self.fc(self.drop(h)), y)


def images(step: int, size: int = 8):
    g = torch.Generator().manual_seed(400 + step)
    return torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 4, (size,), generator=g)


def norm_net() -> NormNet:
    torch.manual_seed(0)
    model = NormNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def eval_reference():
    model = norm_net().eval()
    with torch.no_grad():
        return {"eval": [float(model(*images(i))) for i in (0, 1)], "eval_bigger": float(model(*images(5, size=12)))}


def local_statistics_reference(world: int) -> float:
    """DDP's semantics in one process: each slice normalized by its own statistics; the loss is
    the mean of the slices' losses (equal slices)."""
    model = norm_net()
    model.drop.p = 0.0
    with torch.no_grad():
        return sum(float(model(*[x.chunk(world)[r] for x in images(0)])) for r in range(world)) / world


def batch_cut_plan(model, world: int, batch_norm: str = "global"):
    """A plan for ``norm_net`` on ``world`` devices whose batch norm is cut over the batch, priced
    for ``batch_norm``'s statistics."""
    from fxpar.planner import capture_and_annotate
    from fxpar.solve.strategies import node_strategies

    gm = capture_and_annotate(model, images(0))
    (bn,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten._native_batch_norm_legit_functional.default]
    cut = [s for s in node_strategies(bn, (world,)) if repr(s.inputs[0][0]) == "S(0)"]
    return fxpar.plan(model, images(0), cluster=fxpar.api.local_cluster(world), mesh_shape=(world,),
                      force={bn.name: cut[0].label()}, batch_norm=batch_norm)


def evaluate(rank: int):
    world = dist.get_world_size()
    model = norm_net()
    model.drop.p = 0.0
    # DDP's statistics are each device's slice's: the plan cuts the batch norm's batch (pinned, so
    # that the test does not depend on the cost model's choice for a net this small).
    per_device = fxpar.compile(model, images(0), codegen="eager", batch_norm="local",
                               plan=batch_cut_plan(model, world, batch_norm="local"))
    local_stats_loss = float(per_device(*local(images(0), rank, world)).detach())
    compiled = fxpar.compile(norm_net(), images(0), codegen="eager")
    stats = compiled.bn.running_mean.clone()
    compiled.eval()
    with torch.no_grad():
        losses = [float(compiled(*local(images(i), rank, world))) for i in (0, 1)]
        bigger = float(compiled(*local(images(5, size=12), rank, world)))
    key = (False, False, None, tuple(tuple(x.shape) for x in local(images(0), rank, world)))
    eval_graph = compiled.variants[key].local_graph
    backward_ops = lambda g: [str(n.target) for n in g.graph.nodes if "backward" in str(n.target)]  # noqa: E731
    return {
        "eval": losses,
        "eval_bigger": bigger,
        "stats_unchanged": torch.equal(stats, compiled.bn.running_mean),
        "eval_backward_ops": backward_ops(eval_graph),
        "train_backward_ops": backward_ops(compiled.local_graph),
        "eval_num_grads": compiled.variants[key].num_grads,
        "training_again": compiled.train().training and compiled.bn.training,
        "local_stats_loss": local_stats_loss,
    }


def autocast_loop(rank: int, num_steps: int, amp, dtype):
    world = dist.get_world_size()
    _, compiled = _compiled(codegen="eager", dtype=dtype)
    opt = adamw_by_name(compiled)
    cast = lambda xs: [x.to(dtype) if x.is_floating_point() else x for x in xs]  # noqa: E731
    out = [step(compiled, opt, local(cast(batch(i)), rank, world), amp=amp) for i in range(num_steps)]
    return {"steps": out, "state": full_state(compiled), "variants": [k[2] is not None for k in compiled.variants]}


def _outcome(fn):
    start = time.perf_counter()
    try:
        fn()
    except fxpar.FxparError as exc:
        return type(exc).__name__, str(exc), time.perf_counter() - start
    return None, None, time.perf_counter() - start


def fail_while_planning(rank: int):
    """Rank 0 alone plans for a device too small for any plan."""
    cpu = fxpar.preset("cpu-local", num_devices=2)
    tiny = dataclasses.replace(cpu, device=dataclasses.replace(cpu.device, memory_bytes=1e3))
    return _outcome(lambda: fxpar.compile(mlp(), batch(0), cluster=tiny if rank == 0 else None, codegen="eager"))


def batch_that_does_not_divide(rank: int):
    return _outcome(lambda: fxpar.compile(mlp(), batch(0, size=7), codegen="eager"))


def different_models(rank: int):
    return _outcome(lambda: fxpar.compile(mlp(64 if rank == 0 else 48), batch(0), codegen="eager"))


class GeluMLP(MLP):
    """``mlp()``'s parameters, another step: GELU where ``MLP`` has ReLU."""

    def forward(self, x, y):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.nn.functional.gelu(x) if i < len(self.layers) - 1 else x
        return torch.nn.functional.cross_entropy(x, y)


def different_steps(rank: int):
    plan = fxpar.plan(mlp(), batch(0), mesh_shape=(2,), force=SHARDED)
    model = mlp() if rank == 0 else GeluMLP((16, 64, 32, 8))
    return _outcome(lambda: fxpar.compile(model, batch(0), plan=plan, codegen="eager"))


def different_plans(rank: int):
    plan = fxpar.plan(mlp(), batch(0), mesh_shape=(2,), force=SHARDED if rank == 0 else OTHER_SHARDED)
    return _outcome(lambda: fxpar.compile(mlp(), batch(0), plan=plan, codegen="eager"))


def state_dict_on_rank_zero_only(rank: int):
    plan = fxpar.plan(mlp(), batch(0), mesh_shape=(2,), force=SHARDED)
    compiled = fxpar.compile(mlp(), batch(0), plan=plan, codegen="eager")
    compiled.state_dict_timeout_s = 3.0
    if rank == 0:
        return _outcome(compiled.state_dict)
    time.sleep(6.0)  # rank 1 stays alive past rank 0's deadline, and never joins
    return None


def failures(rank: int):
    """Each failing compile in turn, in one process group: after every collective failure the
    ranks are still in step, so the next compile works."""
    out = {}
    for name, fn in (("planning", fail_while_planning), ("divide", batch_that_does_not_divide),
                     ("models", different_models), ("plans", different_plans), ("steps", different_steps)):
        out[name] = fn(rank)
    out["afterwards"] = _outcome(lambda: fxpar.compile(mlp(), batch(0), codegen="eager"))
    return out


def norm_net_amp_reference():
    """A training step of the batch-norm net (no dropout) under bf16 autocast, in one process."""
    model = norm_net()
    model.drop.p = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(*images(0))
    return float(loss.detach()), model.bn.running_mean.clone()


def amp_and_bf16(rank: int, num_steps: int):
    model = norm_net()
    model.drop.p = 0.0
    compiled = fxpar.compile(model, images(0), codegen="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # batch norm over bf16 activations, global statistics
        bn_loss = float(compiled(*local(images(0), rank, dist.get_world_size())).detach())
    return {"autocast": autocast_loop(rank, num_steps, torch.bfloat16, torch.float32),
            "bf16": autocast_loop(rank, num_steps, None, torch.bfloat16),
            "bn": (bn_loss, compiled.bn.running_mean.clone())}


def bad_step_inputs(rank: int):
    """Each wrong call of a compiled step raises its error (checked here, on the ranks)."""
    import pytest

    with pytest.raises(fxpar.PlanOptionError, match=r"batch_norm='per-device' is not one of \['global', 'local'\]"):
        fxpar.compile(mlp(), batch(0), batch_norm="per-device")
    compiled = fxpar.compile(mlp(), batch(0), codegen="eager")
    x, y = local(batch(1), rank, dist.get_world_size())
    with pytest.raises(fxpar.StepInputError, match=r"takes its inputs by position.*got keyword argument\(s\) \['y'\]"):
        compiled(x, y=y)
    with pytest.raises(fxpar.StepInputError, match=r"input\[0\] has dtype torch.float64 but the step was planned for torch.float32; pass x.to\(torch.float32\)"):
        compiled(x.double(), y)
    with pytest.raises(fxpar.StepInputError, match=r"input\[1\] is on meta but this rank's step runs on cpu"):
        compiled(x, y.to("meta"))
    with pytest.raises(fxpar.StepInputError, match=r"input\[1\] is a list; the compiled step takes tensors"):
        compiled(x, y.tolist())
    with pytest.raises(fxpar.ShardingError, match=r"an evaluation call takes this rank's slice of a batch shaped like the planned one, \[N, 16\]"):
        with torch.no_grad():
            compiled(x[:, :8], y)
    return True


def compile_with_plan_cache(rank: int, directory: str):
    """The first compile writes the plan into the cache; a plan planted there under the same key is
    what the next compile runs (so it read the cache instead of solving)."""
    import pathlib

    first = fxpar.compile(mlp(), batch(0), plan_cache=directory, codegen="eager")
    files = sorted(pathlib.Path(directory).glob("plan-*.json"))
    written = files[0].read_text() if len(files) == 1 else None
    dist.barrier()
    planted = fxpar.plan(mlp(), batch(0), mesh_shape=(2,), force=SHARDED).to_json()
    if rank == 0:
        files[0].write_text(planted)
    dist.barrier()
    second = fxpar.compile(mlp(), batch(0), plan_cache=directory, codegen="eager")
    return {"num_files": len(files), "written_is_plan": written == first.plan.to_json(),
            "first_differs": first.plan.to_json() != planted, "second_is_planted": second.plan.to_json() == planted}


def _grads_after_scaled_backwards(module, xs_list, scales) -> dict:
    """Gradients after ``(loss_i * scale_i).backward()`` for each batch, accumulated."""
    for xs, scale in zip(xs_list, scales):
        loss = module(*xs)
        if scale is None:
            loss.backward()
        else:
            loss.backward(torch.tensor(scale))
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for n, p in module.named_parameters()}


SCALES = (None, 2.5, 0.125)  # a plain backward, then scaled ones accumulating into it


def scaled_backward_reference() -> dict:
    torch.manual_seed(0)
    return _grads_after_scaled_backwards(mlp(), [batch(i) for i in range(len(SCALES))], SCALES)


def scaled_backward(rank: int) -> dict:
    """Gradients of a sharded plan after a plain and two scaled backwards (a loss scaler's, or
    gradient accumulation's), full tensors."""
    _, compiled = _compiled(SHARDED)
    world = dist.get_world_size()
    return _grads_after_scaled_backwards(compiled, [local(batch(i), rank, world) for i in range(len(SCALES))], SCALES)


def _conv_steps(module, opt, num_steps: int, rank: int, world: int) -> list[float]:
    return [step(module, opt, local(images(i), rank, world), clip=None)[0] for i in range(num_steps)]


def conv_net_reference(num_steps: int) -> tuple[list[float], dict]:
    model = norm_net()
    model.drop.p = 0.0
    # SGD, not Adam: the convolution's bias feeds batch norm, so its gradient is 0 up to rounding,
    # which Adam would scale up to full steps.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return _conv_steps(model, opt, num_steps, 0, 1), full_state(model)


def conv_net_compiled(rank: int, num_steps: int) -> tuple[list[float], dict, list[str]]:
    """The conv net trained on a batch-cut plan, compiled by Inductor; its losses, full state and
    the per-rank graph's ops (to see the channels-last copy of the images)."""
    world = dist.get_world_size()
    model = norm_net()
    model.drop.p = 0.0
    compiled = fxpar.compile(model, images(0), plan=batch_cut_plan(model, world), codegen="inductor")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    losses = _conv_steps(compiled, opt, num_steps, rank, world)
    ops = [f"{n.target}:{n.kwargs.get('memory_format')}" for n in compiled.local_graph.graph.nodes if n.op == "call_function"]
    return losses, full_state(compiled), ops
