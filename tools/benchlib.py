"""What the benchmarks under tools/ share: the models, the reference plans forced through
``fxpar.plan(..., force=...)``, interleaved timing on local gloo ranks, and statistics.

The reference plans are each defined by the placement of the parameters (and, for ZeRO-3, of every
other node); the solver completes whatever the force leaves open, so each is the best plan of its
family under the cost model.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxpar  # noqa: E402
from fxpar.models import GPT, MLP, GPTConfig, ResNet18  # noqa: E402
from fxpar.placement import spec_str  # noqa: E402
from fxpar.plan import Plan  # noqa: E402
from fxpar.runtime.memory import LiveTensorBytes  # noqa: E402


def small_models() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    """name -> (constructor, global batch): sizes that run a step in tens of ms on a CPU core."""
    return {
        "mlp": (lambda: MLP((512, 1024, 1024, 10)), 256),
        "cnn": (lambda: ResNet18(num_classes=10, image_size=32, width=0.25), 32),
        "transformer": (lambda: GPT(GPTConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=4, d_model=128)), 16),
    }


def build(name: str, models: dict | None = None) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model and its example global batch, the same on every rank (fixed seeds)."""
    ctor, batch = (models or small_models())[name]
    torch.manual_seed(0)
    model = ctor()
    return model, tuple(model.example_inputs(batch))


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def megatron_params(model: nn.Module) -> dict[str, str]:
    """Megatron-style tensor parallelism on a 1-D axis: a linear layer whose output feeds the next
    linear is column-parallel (weight S(0), bias S(0)), the next row-parallel (weight S(1), bias R);
    attention projections q/k/v column, out_proj row; a convolution splits its output channels."""
    force: dict[str, str] = {}
    if isinstance(model, GPT):
        for name, _ in _linear_layers(model):
            col = name.endswith(("q_proj", "k_proj", "v_proj", "fc"))
            force[f"{name}.weight"] = "S(0)" if col else "S(1)"
            force[f"{name}.bias"] = "S(0)" if col else "R"
        return force
    layers = _linear_layers(model)
    for i, (name, layer) in enumerate(layers):
        col = i % 2 == 0 and i + 1 < len(layers)
        force[f"{name}.weight"] = "S(0)" if col else "S(1)"
        if layer.bias is not None:
            force[f"{name}.bias"] = "S(0)" if col else "R"
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            force[f"{name}.weight"] = "S(0)"
    return force


def hybrid_params(model: nn.Module) -> dict[str, str]:
    """Data parallel for the compute-heavy layers, tensor parallel for the weight-heavy ones (the
    'one weird trick'): convolutions and attention replicated, linear layers of the classifier or
    the MLP blocks Megatron-split; for a plain MLP the first layer replicated, the rest split."""
    tp = megatron_params(model)
    force = {fqn: "R" for fqn, _ in model.named_parameters()}
    if isinstance(model, MLP):
        first = _linear_layers(model)[0][0]
        force.update({k: v for k, v in tp.items() if not k.startswith(first + ".")})
    elif isinstance(model, GPT):
        force.update({k: v for k, v in tp.items() if k.split(".")[-2] in ("fc", "proj")})
    else:
        for name, layer in _linear_layers(model):
            force[f"{name}.weight"] = "S(0)"
            if layer.bias is not None:
                force[f"{name}.bias"] = "S(0)"
    return force


def _shard_dim(shape: tuple[int, ...], ways: int) -> int | None:
    for d, s in enumerate(shape):
        if s % ways == 0 and s > 1:
            return d
    return None


def on_axes(placement: str, mesh: tuple[int, ...], axes: tuple[int, ...]) -> str:
    """A 1-D placement ('R', 'S(0)', ...) applied on mesh ``axes``, replicated on the others, as
    ``force`` writes it ('S(0)' on a 1-D mesh, '(R,S(0))' on a 2-D one)."""
    parts = [placement if a in axes else "R" for a in range(len(mesh))]
    return parts[0] if len(mesh) == 1 else "(" + ",".join(parts) + ")"


def zero_params(model: nn.Module, mesh: tuple[int, ...]) -> dict[str, str]:
    """Every parameter sharded over all devices along its first dim that divides evenly (else
    replicated): ZeRO-3 / FSDP storage."""
    import math

    force = {}
    for fqn, p in model.named_parameters():
        d = _shard_dim(tuple(p.shape), math.prod(mesh))
        force[fqn] = on_axes("R" if d is None else f"S({d})", mesh, tuple(range(len(mesh))))
    return force


def _spec(mesh: tuple[int, ...], tp_axes: tuple[int, ...], tp: str, dp: str) -> str:
    parts = [tp if a in tp_axes else dp for a in range(len(mesh))]
    return parts[0] if len(mesh) == 1 else "(" + ",".join(parts) + ")"


def pin_tensor_parallel(gm, tp_params: dict[str, str], mesh: tuple[int, ...], tp_axes: tuple[int, ...]) -> dict[str, str]:
    """Node forces that make the forward pass use tensor-parallel weights in place (no gathering
    of a weight): the transpose of a column-split weight stays split and its matmul writes
    column-split outputs; a row-split weight's matmul writes partial sums; a convolution with
    split output channels writes split channels. On the other mesh axes the batch is split."""
    aten = torch.ops.aten
    by_fqn = {n.meta.get("fxpar_fqn"): n for n in gm.graph.nodes if n.op == "placeholder"}
    force: dict[str, str] = {}
    for fqn, placement in tp_params.items():
        p = by_fqn.get(fqn)
        if p is None or placement == "R":
            continue
        shape = tuple(p.meta["val"].shape)
        for u in p.users:
            if len(shape) == 2 and u.target == aten.t.default:
                col = placement == "S(0)"
                force[u.name] = _spec(mesh, tp_axes, "S(1)" if col else "S(0)", "R")
                for mm in u.users:
                    if mm.target in (aten.addmm.default, aten.mm.default) and mm.meta.get("fxpar_phase") == "forward":
                        force[mm.name] = _spec(mesh, tp_axes, "S(1)" if col else "P", "S(0)")
            elif len(shape) == 4 and u.target == aten.convolution.default and placement == "S(0)":
                force[u.name] = _spec(mesh, tp_axes, "S(1)", "S(0)")
    return force


def family_force(family: str, model: nn.Module, mesh: tuple[int, ...]) -> dict[str, str]:
    """The parameter placements that define a plan family on ``mesh``: 'data parallel',
    'tensor parallel' (Megatron over every axis), 'dp x tp' (Megatron on the last axis, data
    parallel on the others), 'hybrid' (see hybrid_params; 1-D), 'zero-3' (parameters only)."""
    every = tuple(range(len(mesh)))
    if family == "data parallel":
        return {fqn: on_axes("R", mesh, every) for fqn, _ in model.named_parameters()}
    if family == "tensor parallel":
        return {k: on_axes(v, mesh, every) for k, v in megatron_params(model).items()}
    if family == "dp x tp":
        return {k: on_axes(v, mesh, (len(mesh) - 1,)) for k, v in megatron_params(model).items()}
    if family == "hybrid":
        return {k: on_axes(v, mesh, every) for k, v in hybrid_params(model).items()}
    if family == "zero-3":
        return zero_params(model, mesh)
    raise ValueError(f"unknown plan family {family!r}")


def forced_plans(gm, model: nn.Module, cluster: fxpar.Cluster, mesh: tuple[int, ...], families: list[str],
                 *, time_limit_s: float = 60.0, skip_timeouts: bool = False) -> dict[str, Plan]:
    """fxpar's own plan ('fxpar') and the best plan of each family on ``mesh``. ZeRO-3 pins every
    node other than the parameters to the data-parallel plan's strategy, so its compute is data
    parallel and its parameters are gathered for use and their gradients reduce-scattered; the
    tensor-parallel families pin the forward use of their split weights (pin_tensor_parallel).
    With ``skip_timeouts`` a family the solver finds no plan for in time is left out."""
    from fxpar.planner import plan_graph

    def plan(force: dict[str, str] | None) -> Plan:
        return plan_graph(gm, cluster=cluster, mesh_shape=mesh, force=force, time_limit_s=time_limit_s)[0]

    from fxpar.errors import PlanTimeoutError

    out: dict[str, Plan] = {}
    for family in ["fxpar"] + families:
        try:
            if family == "fxpar":
                out[family] = plan(None)
            elif family == "zero-3":
                dp = out.get("data parallel") or plan(family_force("data parallel", model, mesh))
                force = {n.name: s.label() for n, s in dp.assignment(gm).items() if n.meta.get("fxpar_role") != "param"}
                force.update(family_force("zero-3", model, mesh))
                out[family] = plan(force)
            else:
                force = family_force(family, model, mesh)
                tp_axes = {"tensor parallel": tuple(range(len(mesh))), "dp x tp": (len(mesh) - 1,), "hybrid": (0,)}.get(family)
                if tp_axes is not None:
                    tp = megatron_params(model) if family != "hybrid" else hybrid_params(model)
                    force.update(pin_tensor_parallel(gm, tp, mesh, tp_axes))
                out[family] = plan(force)
        except PlanTimeoutError as exc:
            if not skip_timeouts:
                raise
            print(f"  no {family} plan on mesh {list(mesh)}: {exc}", flush=True)
    return out


def reference_plans(model: nn.Module, inputs: tuple, cluster: fxpar.Cluster, mesh: tuple[int, ...],
                    *, time_limit_s: float = 60.0) -> dict[str, Plan]:
    """fxpar's plan and the forced reference plans of the fidelity benchmark (1-D mesh)."""
    from fxpar.planner import capture_and_annotate

    gm = capture_and_annotate(model, inputs)
    return forced_plans(gm, model, cluster, mesh, ["data parallel", "tensor parallel", "zero-3", "hybrid"],
                        time_limit_s=time_limit_s)


def param_summary(plan: Plan) -> str:
    """How many parameters each placement holds, e.g. 'R:12 S(0):6 S(1):4'."""
    counts: dict[str, int] = {}
    for spec in plan.param_specs.values():
        key = spec_str(spec)
        counts[key] = counts.get(key, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def compile_with(model: nn.Module, inputs: tuple, plan: Plan, *, batch_norm: str = "global", **kwargs):
    """``fxpar.compile(model, inputs, plan=plan, batch_norm=batch_norm, **kwargs)``: batch norm's
    statistics ``"global"`` (fxpar's default) or ``"local"`` (DDP's per-device statistics)."""
    return fxpar.compile(model, inputs, plan=plan, batch_norm=batch_norm, **kwargs)


# ---- timing on ranks -------------------------------------------------------------------------

def timed_step(step: Callable[[], None]) -> float:
    dist.barrier()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleave(runners: dict[str, Callable[[], None]], *, rounds: int, steps: int, warmup: int = 2,
               before_round: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per step of each runner, measured in ``rounds`` rounds that visit every runner in a
    rotating order for ``steps`` steps, so slow phases of a shared machine hit all runners alike;
    ``before_round`` runs at the start of every round (a calibration pass)."""
    for fn in runners.values():
        for _ in range(warmup):
            timed_step(fn)
    keys = list(runners)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        if before_round is not None:
            before_round()
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            for _ in range(steps):
                times[k].append(timed_step(runners[k]))
    return times


def slowest_rank_median(per_rank: list[list[float]], quantile: float = 0.5) -> float:
    """Median (or another quantile) over steps of the slowest rank's time (ranks wait for each
    other every step)."""
    from fxpar.calibrate import quantile_of

    return quantile_of([max(ts) for ts in zip(*per_rank)], quantile)


def reprice(gm, plan: Plan, cluster: fxpar.Cluster) -> Plan:
    """The same assignment priced under another profile (every node forced to its strategy)."""
    from fxpar.planner import plan_graph

    force = {n.name: s.label() for n, s in plan.assignment(gm).items()}
    return plan_graph(gm, cluster=cluster, mesh_shape=plan.mesh_shape, force=force)[0]


class _PlainLiveTensorBytes(LiveTensorBytes):
    """``LiveTensorBytes`` that lets a tensor subclass (DTensor) dispatch first and counts the plain
    tensors its ops make."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor and not issubclass(torch.Tensor, t) for t in types):
            return NotImplemented
        return super().__torch_dispatch__(func, types, args, kwargs)


def measured_peak_bytes(step: Callable[[], None], resident: list[torch.Tensor]) -> int:
    """Peak bytes of tensor memory during one call of ``step``: the resident tensors (counted by
    storage, once each) plus the peak of the storage the step's ops allocate."""
    from torch.distributed.tensor import DTensor

    # A DTensor (a parameter of fxpar's module or FSDP2's, its optimizer state) holds its rank's
    # piece as a local tensor.
    resident = [t.to_local() if isinstance(t, DTensor) else t for t in resident]
    seen, base = set(), 0
    for t in resident:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            base += t.untyped_storage().nbytes()
    mode = _PlainLiveTensorBytes(resident)
    with mode:
        step()
    return base + mode.peak


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")



def write_report(out: Path, name: str, report: dict, markdown: Callable[[dict], str]) -> None:
    """Write ``report`` as ``out/NAME.json`` and its ``markdown`` table as ``out/NAME.md``, and print
    the table."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
