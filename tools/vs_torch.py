"""fxpar against what users run today, on the same local gloo ranks in one interleaved run.

For each small model (``benchlib.small_models``) one training step (forward, backward, Adam
update) is timed for:

- ``fxpar``: ``fxpar.compile`` with the plan fxpar makes for the calibrated profile (its step
  compiled by Inductor, the default);
- ``fxpar_local_bn`` (models with batch norm only): the same plan with per-device batch-norm
  statistics (the rewrite's ``batch_norm="local"``, DDP's semantics; ``benchlib.compile_with``);
- ``fxpar_whole_batch``: ``fxpar.compile(..., input_placement="replicate")`` with the plan fxpar
  makes when every rank is given the whole batch, as ``tp``'s ranks are;
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (each rank its slice of the batch);
- ``ddp_compile``: ``torch.compile`` over the DDP module (dynamo splits the graph at DDP's buckets);
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on each layer or block and on the root;
- ``fsdp2_compile``: ``torch.compile`` over the fully-sharded model;
- ``ddp_syncbn`` / ``ddp_syncbn_compile`` (models with batch norm only): DDP (and ``torch.compile``
  over it) with every batch norm computing its statistics over the global batch, what fxpar's
  default computes. ``nn.SyncBatchNorm`` cannot run here: its forward refuses CPU tensors and its
  kernels (``torch.batch_norm_stats`` and the rest) exist only for CUDA, so these runners use
  ``CpuSyncBatchNorm`` below, the same computation in plain torch ops with one all-reduce of
  per-channel sums in the forward and one in the backward, as SyncBatchNorm exchanges;
- ``tp``: ``torch.distributed.tensor.parallel.parallelize_module`` with ``ColwiseParallel`` /
  ``RowwiseParallel`` (Megatron pairs; every rank runs the whole batch, as tensor parallelism
  does). Its styles cover linear and embedding layers only, so for the CNN only the classifier is
  split and the convolutions run replicated.

Every rank builds all runners, then the runners of a model take turns (rotating order) for a few
steps per round; the step time is the median over steps of the slowest rank.

    python tools/vs_torch.py [--profile PATH] [--rounds 5] [--steps 3] [--foreach] [--out docs/bench]

``--fused`` gives every runner's Adam ``fused=True``; ``--foreach`` gives it ``foreach=True`` (torch's default on CPU is the per-tensor
loop).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

import fxpar  # noqa: E402
from fxpar.calibrate import calibrate  # noqa: E402
from fxpar.models import GPT, MLP  # noqa: E402
from fxpar.plan import Plan  # noqa: E402

RUNNERS = ("fxpar", "fxpar_local_bn", "fxpar_whole_batch", "ddp", "ddp_compile", "ddp_syncbn", "ddp_syncbn_compile",
           "fsdp2", "fsdp2_compile", "tp")
BASELINES = RUNNERS[3:]
# The baselines that compute what fxpar's default computes on a model with batch norm (statistics
# over the global batch); on a model without batch norm every baseline does.
SAME_SEMANTICS_BN = ("ddp_syncbn", "ddp_syncbn_compile")
BN_ONLY = ("fxpar_local_bn", "ddp_syncbn", "ddp_syncbn_compile")


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch norm (training) over the batch of every rank of the default group: the statistics
    of the global batch from one all-reduce of per-channel sums (and the element count), the input
    gradient from one all-reduce of the two per-channel sums of the backward; the weight and bias
    gradients stay this rank's (DDP averages them), as in ``nn.SyncBatchNorm``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() // c], dtype=x.dtype)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        dist.all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight, n)
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight, n = ctx.saved_tensors
        c = xhat.shape[1]
        dims = [0, *range(2, xhat.dim())]
        shape = [1, c] + [1] * (xhat.dim() - 2)
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        total = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(total)
        mean_dy, mean_dy_xhat = total[:c] / n, total[c:] / n
        dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * (invstd * weight).view(shape)
        return dx, sum_dy_xhat, sum_dy, None, None, None, None


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``nn.SyncBatchNorm``'s computation for CPU ranks (see the module docstring): global batch
    statistics in training, the running statistics in evaluation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        self.num_batches_tracked.add_(1)
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every batch norm replaced by a ``CpuSyncBatchNorm`` holding its tensors."""
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
            else:
                cls.convert(child)
        return module


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one: the MLP's layers, the transformer's blocks, the CNN's
    residual blocks."""
    if isinstance(model, MLP):
        return list(model.layers)
    if isinstance(model, GPT):
        return list(model.blocks)
    return [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]


def _tp_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """GPT attention for column-split q, k, v: each rank holds n_head / world whole heads (the
    model's own forward derives the head count from the full width)."""
    b, t, d = x.shape
    heads = [p(x).view(b, t, -1, d // self.n_head).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)]
    y = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
    return self.dropout(self.out_proj(y.transpose(1, 2).reshape(b, t, -1)))


def _tp_plan(model: nn.Module, world: int) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if isinstance(model, MLP):
        return {"layers.0": ColwiseParallel(), "layers.1": RowwiseParallel()}
    if isinstance(model, GPT):
        plan = {}
        for i, block in enumerate(model.blocks):
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"blocks.{i}.attn.{name}"] = ColwiseParallel()
            plan[f"blocks.{i}.attn.out_proj"] = RowwiseParallel()
            plan[f"blocks.{i}.fc"] = ColwiseParallel()
            plan[f"blocks.{i}.proj"] = RowwiseParallel()
            block.attn.forward = types.MethodType(_tp_attention_forward, block.attn)
        return plan
    return {"fc": ColwiseParallel(output_layouts=Replicate())}


def _runner(kind: str, model_name: str, plans: dict[str, str], rank: int, world: int, foreach: bool | str):
    """``kind``'s training step on this rank; ``plans``: fxpar's plan JSON per fxpar runner."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    model, inputs = benchlib.build(model_name)
    local = [t.chunk(world)[rank] for t in inputs]
    if kind in ("fxpar", "fxpar_local_bn"):
        # Each planned for the statistics it runs (the local one prices no statistics collectives).
        module = benchlib.compile_with(model, inputs, Plan.from_json(plans[kind]),
                                       batch_norm="local" if kind == "fxpar_local_bn" else "global")
    elif kind == "fxpar_whole_batch":
        # Every rank given the whole batch, as TP's ranks are (fxpar's input_placement="replicate").
        module = benchlib.compile_with(model, inputs, Plan.from_json(plans[kind]), input_placement="replicate")
        local = list(inputs)
    elif kind in ("ddp", "ddp_compile", "ddp_syncbn", "ddp_syncbn_compile"):
        if kind.startswith("ddp_syncbn"):
            model = CpuSyncBatchNorm.convert(model)
        module = DistributedDataParallel(model)
        if kind.endswith("_compile"):
            module = torch.compile(module, dynamic=False)
    elif kind in ("fsdp2", "fsdp2_compile"):
        mesh = init_device_mesh("cpu", (world,))
        for unit in _units(model):
            fully_shard(unit, mesh=mesh)
        module = fully_shard(model, mesh=mesh)
        if kind == "fsdp2_compile":
            module = torch.compile(module, dynamic=False)
    else:
        mesh = init_device_mesh("cpu", (world,))
        module = parallelize_module(model, mesh, _tp_plan(model, world))
        local = list(inputs)
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    # foreach kernels take DTensors or plain tensors, not both in one list (TP leaves some plain).
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]) if g]
    kernel = {"fused": True} if foreach == "fused" else {"foreach": True if foreach else None}
    opt = torch.optim.Adam([{"params": g} for g in groups], lr=1e-4, **kernel)

    def step() -> None:
        module(*local).backward()
        opt.step()
        opt.zero_grad()

    return step


def _kinds(model_name: str) -> list[str]:
    return [k for k in RUNNERS if k not in BN_ONLY or _has_batch_norm(benchlib.build(model_name)[0])]


def _rank(rank: int, jobs: list[tuple[str, str]], rounds: int, steps: int, foreach: bool | str) -> dict:
    warnings.simplefilter("ignore")
    world = dist.get_world_size()
    times = {}
    for model_name, plans in jobs:
        runners = {kind: _runner(kind, model_name, plans, rank, world, foreach)
                   for kind in _kinds(model_name)}
        for kind, ts in benchlib.interleave(runners, rounds=rounds, steps=steps).items():
            times[f"{model_name}/{kind}"] = ts
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", help="a calibrated profile (default: calibrate now)")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--foreach", action="store_true", help="Adam(foreach=True) for every runner")
    ap.add_argument("--fused", action="store_true", help="Adam(fused=True) for every runner")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cluster = fxpar.Cluster.load(args.profile) if args.profile else calibrate(max_ranks=args.nprocs)
    jobs, plans = [], {}
    for name in args.models.split(","):
        model, inputs = benchlib.build(name)
        plan = fxpar.plan(model, inputs, cluster=cluster, mesh_shape=(args.nprocs,))
        print(f"planned {name}: predicted {plan.predicted_step_s * 1e3:.2f} ms ({benchlib.param_summary(plan)})", flush=True)
        whole = fxpar.plan(model, inputs, cluster=cluster, mesh_shape=(args.nprocs,), input_placement="replicate")
        print(f"planned {name} on the whole batch: predicted {whole.predicted_step_s * 1e3:.2f} ms "
              f"({benchlib.param_summary(whole)})", flush=True)
        plans[name] = {"predicted_step_s": plan.predicted_step_s, "params": benchlib.param_summary(plan),
                       "whole_batch_predicted_step_s": whole.predicted_step_s,
                       "whole_batch_params": benchlib.param_summary(whole)}
        made = {"fxpar": plan.to_json(), "fxpar_whole_batch": whole.to_json()}
        if _has_batch_norm(model):
            local = fxpar.plan(model, inputs, cluster=cluster, mesh_shape=(args.nprocs,), batch_norm="local")
            print(f"planned {name} for per-device batch-norm statistics: predicted {local.predicted_step_s * 1e3:.2f} ms "
                  f"({benchlib.param_summary(local)})", flush=True)
            plans[name].update(local_bn_predicted_step_s=local.predicted_step_s, local_bn_params=benchlib.param_summary(local))
            made["fxpar_local_bn"] = local.to_json()
        jobs.append((name, made))
    print(f"timing {', '.join(RUNNERS)} on {args.nprocs} gloo ranks, {args.rounds} interleaved rounds of {args.steps} steps",
          flush=True)
    load_before = _load()
    kernel = "fused" if args.fused else args.foreach
    results = fxpar.launch(_rank, args.nprocs, jobs, args.rounds, args.steps, kernel)
    rows = []
    for name, *_ in jobs:
        med = {k: benchlib.slowest_rank_median([r[f"{name}/{k}"] for r in results]) if f"{name}/{k}" in results[0] else None
               for k in RUNNERS}
        best = min((k for k in BASELINES if med[k] is not None), key=med.get)
        # fxpar's default against the baselines that compute the same thing.
        same = [k for k in (SAME_SEMANTICS_BN if med["ddp_syncbn"] is not None else BASELINES) if med[k] is not None]
        best_same = min(same, key=med.get)
        rows.append({"model": name, **{f"{k}_s": med[k] for k in RUNNERS}, "best_torch": best,
                     "ratio_to_best": med["fxpar"] / med[best], "best_same_semantics": best_same,
                     "ratio_to_best_same_semantics": med["fxpar"] / med[best_same],
                     "ratio_local_bn_to_best": med["fxpar_local_bn"] / med[best] if med["fxpar_local_bn"] else None,
                     "ratio_whole_batch_to_tp": med["fxpar_whole_batch"] / med["tp"],
                     "ratio_whole_batch_to_best": med["fxpar_whole_batch"] / med[best],
                     **{f"ratio_{k}": med["fxpar"] / med[k] for k in BASELINES if med[k] is not None}, "plan": plans[name]})
    report = {"rows": rows, "profile": cluster.name, "nprocs": args.nprocs, "rounds": args.rounds, "steps": args.steps,
              "adam_foreach": args.foreach,
              "adam_fused": args.fused,
              "load_average_before": load_before, "load_average_after": _load(),
              "wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    (out / "vs_torch.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "vs_torch.md").write_text(table + "\n")
    print(table)


def _load() -> list[float]:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


NAMES = {"fxpar": "fxpar", "fxpar_local_bn": "fxpar local BN", "fxpar_whole_batch": "fxpar whole batch", "ddp": "DDP", "ddp_compile": "DDP+compile",
         "ddp_syncbn": "DDP SyncBN", "ddp_syncbn_compile": "DDP SyncBN+compile", "fsdp2": "FSDP2",
         "fsdp2_compile": "FSDP2+compile", "tp": "TP"}


def markdown(rep: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    cell = lambda s: "-" if s is None else ms(s)  # noqa: E731
    lines = ["| model | " + " | ".join(f"{NAMES[k]} ms" for k in RUNNERS)
             + " | fxpar / best | fxpar / best same semantics | fxpar local BN / best | fxpar whole batch / TP |",
             "|---|" + "---|" * (len(RUNNERS) + 4)]
    for r in rep["rows"]:
        local = "-" if r["ratio_local_bn_to_best"] is None else f"{r['ratio_local_bn_to_best']:.2f}"
        lines.append(f"| {r['model']} | " + " | ".join(cell(r.get(f"{k}_s")) for k in RUNNERS)
                     + f" | {r['ratio_to_best']:.2f} ({NAMES[r['best_torch']]})"
                     + f" | {r['ratio_to_best_same_semantics']:.2f} ({NAMES[r['best_same_semantics']]}) | {local}"
                     + f" | {r['ratio_whole_batch_to_tp']:.2f} |")
    lines.append(f"\nLoad average (1, 5, 15 min) before {rep['load_average_before']}, after {rep['load_average_after']}; "
                 f"Adam foreach={rep.get('adam_foreach', False)}, fused={rep.get('adam_fused', False)}; plans: "
                 + ", ".join(f"{r['model']} {r['plan']['params']} (whole batch: {r['plan']['whole_batch_params']})"
                             for r in rep["rows"] if "plan" in r) + ". "
                 "Best: the fastest baseline; best same semantics: the fastest that computes what fxpar's default "
                 "computes (for a model with batch norm, DDP SyncBN and DDP SyncBN+compile: global batch statistics; "
                 "otherwise every baseline). fxpar whole batch: every rank given the whole batch (input_placement=\"replicate\"), as TP's ranks are.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
