"""``python -m fxpar calibrate``: measure this machine and write a cluster profile (JSON).

Every rank measures at once, as in training (so contention between ranks is in the figures):
per-op overhead (tiny ops in an fx ``GraphModule``, as fxpar runs steps); matmul and convolution
throughput (FLOPs as ``torch.utils.flop_counter`` counts them; the fastest kernel is the peak, the
median of a class its efficiency); the same matmul in bfloat16 and float16 (their speed against
float32 scales the peak into ``peak_flops_by_dtype``); memory bandwidth (elementwise streams,
reductions and norms); the overlap of an asynchronous all-reduce with a matmul; and the
collectives (through ``fxpar.runtime.collectives.DistComm``, the code rewritten steps call, plus
broadcast) on groups of 2..N ranks at several sizes, fitted per collective to the alpha-beta
formulas of ``fxpar.cost``; and each optimizer's update of DTensor parameters as torch.optim runs
it (two sizes, fitted to seconds per parameter plus seconds per byte).
Without a process group the ranks are local gloo processes (``fxpar.launch``); under torchrun the
running backend is measured. Each timing is the median over repeats of the slowest rank
(``--quantile`` picks another). With ``--model MODULE:FACTORY`` the matmul and convolution
kernels of that model's step are also timed by signature, at every per-device shape the planner
may give them (``kernel_calls``), and kept in the profile. ``fxpar.Cluster.load(path)`` reads the
profile back.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from fxpar.cluster import COLLECTIVES, OP_CLASSES, Cluster, DeviceSpec, LinkSpec, dtype_name
from fxpar.cost import collective_time

HELP = "measure this machine (compute, memory, per-op overhead, collectives) and write a profile JSON"


@dataclass(frozen=True)
class Sizes:
    """What to measure; ``quick`` is for smoke tests (tiny sizes, few repeats, rough figures)."""

    # (m, k, n), each run as x @ w, x @ w^T and x^T @ w: the layouts of a linear layer's forward
    # and backward matmuls, which run at different speeds.
    matmuls: tuple[tuple[int, int, int], ...] = ((256, 1024, 1024), (1024, 1024, 1024))
    conv: tuple[int, int, int, int] = (16, 32, 32, 32)  # batch, channels in = out, height = width
    # Elements per stream: an activation-sized one and a large one. Outputs are allocated per call,
    # as a graph's ops allocate theirs (fresh memory costs page faults on CPUs).
    stream_numel: tuple[int, ...] = (1 << 18, 4 << 20)
    reduce_shapes: tuple[tuple[int, int], ...] = ((512, 512), (2048, 2048))
    overhead_ops: int = 200
    collective_bytes: tuple[int, ...] = (256, 16 << 10, 256 << 10, 1 << 20, 4 << 20)
    repeats: int = 9
    # Optimizer updates: this many float32 DTensor parameters of each size (elements), per optimizer;
    # the larger (4 MiB, with its gradient and states 16 MiB a parameter) streams from memory, as a
    # weight matrix's update does, not from cache.
    optimizer_numel: tuple[int, ...] = (256, 1 << 20)
    optimizer_params: int = 16
    # Rows of the in-step measurement's matmuls (``rows`` x k @ k x n of the first matmul's k and n):
    # compute segments of about 0.7, 2 and 9 ms between blocking collectives on this project's CPUs,
    # the range a step's layers have. What a collective adds depends on the segment, and not
    # monotonically, so the extra priced is the median over these.
    in_step_rows: tuple[int, ...] = (16, 64, 256)
    # Seconds of matmuls and memory streams on every rank before anything is timed: a device under
    # sustained load (as in training) runs slower than one just woken (CPU clocks, caches). On this
    # project's 2-core machines, 30 s of it took the matmul rate to 0.91x and the elementwise rate
    # to 0.73x of a cold measurement (docs/cost-model.md, Calibration).
    warmup_s: float = 10.0


# The dtypes whose matmul speed is measured against float32 (keys of DeviceSpec.peak_flops_by_dtype).
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Their entries among the raw measurements: {"matmul_bfloat16": "bfloat16", ...}.
DTYPE_MATMULS = {f"matmul_{dtype_name(d)}": dtype_name(d) for d in LOW_PRECISION}
# A kernel slower than this on its first call is timed once more, not ``repeats`` times: a dtype
# the machine has no fast path for (float16 on many CPUs) would otherwise take most of the run.
SLOW_KERNEL_S = 0.05

QUICK = Sizes(((64, 128, 128),), (2, 8, 8, 8), (1 << 14,), ((64, 256),), 50, (256, 16 << 10), 3, (256, 1 << 14),
              in_step_rows=(16,), warmup_s=0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int, *, warmup: bool = True) -> list[float]:
    if warmup:
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


_VERBOSE = [True]


def _say(rank: int, text: str) -> None:
    if rank == 0 and _VERBOSE[0]:
        print(f"[calibrate] {text}", flush=True)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _overhead_graph(num_ops: int) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = x
    for _ in range(num_ops):
        y = graph.call_function(torch.ops.aten.add.Tensor, (y, x))
    graph.output(y)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _compute(rank: int, sizes: Sizes, device: torch.device) -> dict[str, list]:
    """Raw timings: {"what": [(work, [seconds per repeat])]}; work is FLOPs or bytes."""
    out: dict[str, list] = {}
    reps = sizes.repeats
    gm = _overhead_graph(sizes.overhead_ops)
    tiny = torch.ones(4, device=device)
    _say(rank, f"per-op overhead: fx graph of {sizes.overhead_ops} tiny ops")
    out["overhead"] = [(sizes.overhead_ops, _time(lambda: gm(tiny), device, reps))]
    out["matmul"] = []
    for m, k, n in sizes.matmuls:
        _say(rank, f"matmul {m}x{k} @ {k}x{n}, three layouts")
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        bt, at = torch.randn(n, k, device=device), torch.randn(k, m, device=device)
        for fn in (lambda: torch.mm(a, b), lambda: torch.mm(a, bt.t()), lambda: torch.mm(at.t(), b)):
            out["matmul"].append((_flops(fn), _time(fn, device, reps)))
    m, k, n = sizes.matmuls[0]
    for dtype in LOW_PRECISION:
        name = dtype_name(dtype)
        _say(rank, f"matmul {m}x{k} @ {k}x{n} in {name}")
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)

        def fn(a=a, b=b):
            return torch.mm(a, b)

        start = time.perf_counter()
        fn()  # the warm-up call, timed to choose the repeats
        _sync(device)
        first = time.perf_counter() - start
        # 2mkn: an mm's FLOPs as FlopCounterMode counts them (counting would run the kernel again).
        out[f"matmul_{name}"] = [(2 * m * k * n, _time(fn, device, reps if first < SLOW_KERNEL_S else 1, warmup=False))]
    batch, ch, hw, _ = sizes.conv[0], sizes.conv[1], sizes.conv[2], sizes.conv[3]
    _say(rank, f"convolution 3x3, batch {batch}, {ch} channels, {hw}x{hw}, forward and backward")
    x = torch.randn(batch, ch, hw, hw, device=device, requires_grad=True)
    w = torch.randn(ch, ch, 3, 3, device=device, requires_grad=True)
    fwd = lambda: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    y = fwd().detach()
    grad = torch.randn_like(y)
    bwd = lambda: torch.autograd.grad(fwd(), (x, w), grad)  # noqa: E731
    out["convolution"] = [(_flops(fwd), _time(fwd, device, reps)), (_flops(bwd), _time(bwd, device, reps))]
    mib = ", ".join(f"{n * 4 / 2**20:g}" for n in sizes.stream_numel)
    _say(rank, f"memory bandwidth: streams of {mib} MiB, reductions")
    out["elementwise"] = []
    for numel in sizes.stream_numel:
        s1, s2 = torch.randn(numel, device=device), torch.randn(numel, device=device)
        dst = torch.empty_like(s1)
        nbytes = s1.numel() * s1.element_size()
        out["elementwise"] += [(3 * nbytes, _time(lambda: torch.add(s1, s2), device, reps)),
                               (2 * nbytes, _time(lambda: torch.relu(s1), device, reps)),
                               (2 * nbytes, _time(lambda: dst.copy_(s1), device, reps))]
    # Work in bytes as the cost model counts them: a node's inputs and outputs.
    F = torch.nn.functional
    out["reduction"] = []
    for shape in sizes.reduce_shapes:
        r = torch.randn(*shape, device=device)
        rbytes = r.numel() * r.element_size()
        out["reduction"] += [(rbytes + rbytes // r.shape[1], _time(lambda: r.sum(dim=1), device, reps)),
                             (2 * rbytes, _time(lambda: torch.softmax(r, dim=1), device, reps)),
                             (2 * rbytes, _time(lambda: F.layer_norm(r, (r.shape[1],)), device, reps))]
    fmap = torch.randn(batch, ch, hw, hw, device=device)
    fbytes = fmap.numel() * fmap.element_size()
    out["reduction"].append((2 * fbytes, _time(lambda: F.batch_norm(fmap, None, None, training=True), device, reps)))
    return out


def _collectives(rank: int, world: int, sizes: Sizes, device: torch.device) -> dict[str, list]:
    """{"kind": [(n, bytes per device as the cost formula takes it, [seconds per repeat])]}."""
    from torch.distributed.device_mesh import DeviceMesh

    from fxpar.runtime.collectives import DistComm

    out: dict[str, list] = {k: [] for k in COLLECTIVES}
    for n in range(2, world + 1):
        # Every rank takes part in making each group; ranks outside it wait at the barrier.
        mesh = DeviceMesh(device.type, list(range(n)))
        group = mesh.get_group(0)
        _say(rank, f"collectives on {n} ranks: {', '.join(COLLECTIVES)} at {len(sizes.collective_bytes)} sizes")
        if rank < n:
            comm = DistComm(mesh)
            for nbytes in sizes.collective_bytes:
                numel = max(n, nbytes // 4 // n * n)
                x = torch.randn(numel, device=device)
                size = numel * 4
                calls = {
                    "all_reduce": (lambda: comm.all_reduce(x, 0), size),
                    "all_gather": (lambda: comm.all_gather(x, 0, 0), size * n),
                    "reduce_scatter": (lambda: comm.reduce_scatter(x, 0, 0), size),
                    "all_to_all": (lambda: comm.all_to_all(x, 0, 0, 0), size),
                    "broadcast": (lambda: dist.broadcast(x, 0, group=group), size),
                }
                # Small messages are cheap and their latency noisy: repeat them more.
                repeats = sizes.repeats * (3 if nbytes <= 64 << 10 else 1)
                for kind, (fn, formula_bytes) in calls.items():
                    times = []
                    fn()
                    for _ in range(repeats):
                        dist.barrier(group=group)
                        start = time.perf_counter()
                        fn()
                        _sync(device)
                        times.append(time.perf_counter() - start)
                    out[kind].append((n, formula_bytes, times))
        dist.barrier()
    return out


def _overlap(rank: int, sizes: Sizes, device: torch.device) -> dict[str, list[float]]:
    """Seconds per repeat of a matmul alone, an all-reduce alone, and the all-reduce started
    asynchronously (as the runtime starts gradient syncs) with the matmul run before waiting."""
    m, k, n = sizes.matmuls[0]
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    x = torch.randn(sizes.collective_bytes[-1] // 4, device=device)
    _say(rank, f"overlap: all-reduce of {x.numel() * 4 / 2**20:.2f} MiB under a {m}x{k} @ {k}x{n} matmul")

    def both() -> None:
        work = dist.all_reduce(x.clone(), async_op=True)
        torch.mm(a, b)
        work.wait()

    fns = {"compute": lambda: torch.mm(a, b), "comm": lambda: dist.all_reduce(x.clone()), "both": both}
    return _time_after_barriers(fns, sizes.repeats, device)


def _time_after_barriers(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` calls of every function in ``fns`` (after one untimed call),
    each call started after a barrier and ended after the device synchronizes."""
    out: dict[str, list[float]] = {key: [] for key in fns}
    for key, fn in fns.items():
        fn()
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            _sync(device)
            out[key].append(time.perf_counter() - start)
    return out


IN_STEP_COLLECTIVES = 8  # all-reduces per repeat of the in-step measurement
IN_STEP_BYTES = 1024
# The second size, an activation's: what a collective adds in a step grows with its bytes (the
# bandwidth reached between computations is lower than after a barrier).
IN_STEP_LARGE_BYTES = 1 << 20


def _in_step(rank: int, sizes: Sizes, device: torch.device) -> dict[str, list[float]]:
    """Seconds per repeat of ``IN_STEP_COLLECTIVES`` matmuls run back to back, and of the same
    matmuls each followed by a blocking all-reduce of ``IN_STEP_BYTES`` bytes (through
    ``DistComm``, as a rewritten step calls it), with no barrier between them: as a step's
    collectives run, where the ranks arrive at each at different moments. One barrier per repeat.
    For each of ``sizes.in_step_rows`` (the matmul's rows: the compute segment's length), under
    ``compute@ROWS`` and ``both@ROWS``; with all-reduces of ``IN_STEP_LARGE_BYTES`` under
    ``large@ROWS``."""
    from torch.distributed.device_mesh import DeviceMesh

    from fxpar.runtime.collectives import DistComm

    _, k, n = sizes.matmuls[0]
    x = torch.randn(IN_STEP_BYTES // 4, device=device)
    large = torch.randn(IN_STEP_LARGE_BYTES // 4, device=device)
    comm = DistComm(DeviceMesh(device.type, list(range(dist.get_world_size()))))
    _say(rank, f"in-step collectives: {IN_STEP_COLLECTIVES} all-reduces of {IN_STEP_BYTES} and {IN_STEP_LARGE_BYTES} bytes between "
               f"{'/'.join(map(str, sizes.in_step_rows))}x{k} @ {k}x{n} matmuls")
    out: dict[str, list[float]] = {}
    for rows in sizes.in_step_rows:
        a, b = torch.randn(rows, k, device=device), torch.randn(k, n, device=device)

        def compute(a=a, b=b) -> None:
            for _ in range(IN_STEP_COLLECTIVES):
                torch.mm(a, b)

        def both(a=a, b=b, y=x) -> None:
            for _ in range(IN_STEP_COLLECTIVES):
                torch.mm(a, b)
                comm.all_reduce(y, 0)

        timed = _time_after_barriers({"compute": compute, "both": both, "large": lambda: both(y=large)},
                                     sizes.repeats, device)
        for key, ts in timed.items():
            out[f"{key}@{rows}"] = ts
    return out


# torch.optim's class and arguments for each optimizer fxpar prices (fxpar.cluster.OPTIMIZERS).
TORCH_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {}),
    "sgd-momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
}


def _optimizers(rank: int, sizes: Sizes, device: torch.device) -> dict[str, list]:
    """Raw timings of ``optimizer.step()`` over parameters held as the runtime holds them
    (``nn.Parameter`` of a replicated DTensor on all ranks, its gradient set) with torch.optim's
    defaults: {optimizer: [(bytes of one parameter, [seconds per parameter per repeat])]}."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.device_mesh import init_device_mesh

    _say(rank, f"optimizer updates: {', '.join(TORCH_OPTIMIZERS)} on {sizes.optimizer_params} DTensor parameters "
               f"of {', '.join(str(n) for n in sizes.optimizer_numel)} elements")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def dtensor(numel: int) -> DTensor:
        return DTensor.from_local(torch.randn(numel, device=device), mesh, [Replicate()], run_check=False)

    out: dict[str, list] = {}
    for name, (cls, kwargs) in TORCH_OPTIMIZERS.items():
        out[name] = []
        for numel in sizes.optimizer_numel:
            params = [torch.nn.Parameter(dtensor(numel)) for _ in range(sizes.optimizer_params)]
            for p in params:
                p.grad = dtensor(numel)
            opt = cls(params, lr=1e-3, **kwargs)
            times = _time(opt.step, device, sizes.repeats)
            out[name].append((numel * 4, [t / len(params) for t in times]))
    return out


HANDOFF_PARAMS = 32  # DTensor parameters whose gradients the hand-over measurement passes per step


def _handoff(rank: int, sizes: Sizes, device: torch.device) -> list[float]:
    """Seconds per parameter per repeat of what ``FxparModule`` does for its trainable parameters
    around the compiled graph, through its own autograd function (``fxpar.runtime.module._Step``)
    with a stand-in for the graph (which returns gradients made beforehand): carrying
    ``HANDOFF_PARAMS`` replicated DTensor parameters into the step, handing their gradients to
    autograd's accumulation, and clearing them as ``zero_grad()`` does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    from fxpar.runtime.module import _Step

    _say(rank, f"gradient hand-over: {HANDOFF_PARAMS} DTensor parameters through the module's autograd function")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    params = [torch.nn.Parameter(DTensor.from_local(torch.randn(256, device=device), mesh, [Replicate()], run_check=False))
              for _ in range(HANDOFF_PARAMS)]
    grads = [torch.ones(256, device=device) for _ in params]
    loss = torch.zeros((), device=device)

    class Graph:  # the compiled graph's stand-in: the loss and this rank's gradients
        @staticmethod
        def run(local, rest):
            return loss, grads, []

    class Module:
        @staticmethod
        def _apply_updates(variant, updates):
            pass

    def step() -> None:
        _Step.apply(Module, Graph, len(params), *params).backward()
        for p in params:
            p.grad = None

    return [t / len(params) for t in _time(step, device, sizes.repeats)]


def _fit_optimizer(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds per parameter, seconds per byte) of a line through (bytes, seconds) points, least
    squares, neither below zero."""
    x, y = np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)
    per_byte = max(0.0, float(np.polyfit(x, y, 1)[0])) if len(points) > 1 else 0.0
    fixed = float(np.mean(y - per_byte * x))
    if fixed < 0:
        fixed, per_byte = 0.0, float(np.sum(x * y) / np.sum(x * x))
    return fixed, per_byte


def _warm_up(rank: int, sizes: Sizes, device: torch.device) -> None:
    """``sizes.warmup_s`` seconds of the first matmul and the largest memory stream (its output
    allocated per call) on every rank at once, untimed: the device's sustained state."""
    if sizes.warmup_s <= 0:
        return
    _say(rank, f"warming up: {sizes.warmup_s:g} s of matmuls and memory streams")
    m, k, n = sizes.matmuls[0]
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    x = torch.randn(sizes.stream_numel[-1], device=device)
    start = time.perf_counter()
    while time.perf_counter() - start < sizes.warmup_s:
        torch.mm(a, b)
        torch.relu(x + 1.0)
    _sync(device)


def measure(rank: int, sizes: Sizes, *, verbose: bool = True) -> dict:
    """One rank's raw measurements (call inside a process group; every rank must call it)."""
    _VERBOSE[0] = verbose
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    world = dist.get_world_size()
    _say(rank, f"{world} ranks on {device.type}, backend {dist.get_backend()}, {torch.get_num_threads()} threads per rank")
    _warm_up(rank, sizes, device)
    dist.barrier()
    compute = _compute(rank, sizes, device)
    dist.barrier()
    comms = _collectives(rank, world, sizes, device)
    overlap = _overlap(rank, sizes, device)
    in_step = _in_step(rank, sizes, device)
    optimizers = _optimizers(rank, sizes, device)
    handoff = _handoff(rank, sizes, device)
    return {"compute": compute, "collectives": comms, "overlap": overlap, "in_step": in_step, "optimizers": optimizers,
            "handoff": handoff, "threads": torch.get_num_threads(), "device": device.type,
            "backend": str(dist.get_backend())}


def merge_measurements(runs: list[list[dict]]) -> list[dict]:
    """One set of per-rank measurements from several runs of ``measure`` (each a list over ranks),
    their repeats pooled: a profile of the whole period the runs span."""
    merged = []
    for per_run in zip(*runs):
        first = per_run[0]
        rank = {**first, "compute": {}, "collectives": {}, "overlap": {}, "in_step": {}}
        for part in ("compute", "optimizers") if all("optimizers" in r for r in per_run) else ("compute",):
            rank[part] = {kind: [(e[0], [t for r in per_run for t in r[part][kind][i][1]]) for i, e in enumerate(entries)]
                          for kind, entries in first[part].items()}
        for kind, entries in first["collectives"].items():
            rank["collectives"][kind] = [(e[0], e[1], [t for r in per_run for t in r["collectives"][kind][i][2]])
                                         for i, e in enumerate(entries)]
        for part in ("overlap", "in_step"):
            for key in first.get(part, {}):
                rank[part][key] = [t for r in per_run for t in r[part][key]]
        if all("handoff" in r for r in per_run):
            rank["handoff"] = [t for r in per_run for t in r["handoff"]]
        merged.append(rank)
    return merged


def _slowest(per_rank: list[list[float]], quantile: float = 0.5) -> float:
    """The ``quantile`` over repeats (0.5: the median) of the slowest rank's time."""
    return quantile_of([max(ts) for ts in zip(*per_rank)], quantile)


def quantile_of(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (``statistics.median`` for q = 0.5)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _fit_link(points: list[tuple[int, int, float]], kind: str, overhead: float) -> tuple[float, float]:
    """Least-squares (relative error) fit of alpha and 1/B to t - overhead over (n, S, t) points."""
    rows, ts = [], []
    for n, nbytes, t in points:
        lat = collective_time(kind, 0.0, n, 1.0, 1.0)
        per_byte = collective_time(kind, float(nbytes), n, 1.0, 0.0)
        rows.append([lat, per_byte])
        ts.append(max(t - overhead, 1e-9))
    a, b = np.array(rows), np.array(ts)
    w = 1.0 / b
    coef, *_ = np.linalg.lstsq(a * w[:, None], b * w, rcond=None)
    alpha, inv_bw = float(coef[0]), float(coef[1])
    if alpha < 0:
        alpha = 0.0
        inv_bw = float(np.sum(w * w * a[:, 1] * b) / np.sum(w * w * a[:, 1] ** 2))
    if inv_bw <= 0:  # latency-bound at every size measured: the bandwidth is beyond resolution
        inv_bw = 1e-12
        alpha = float(np.median((b - a[:, 1] * inv_bw) / a[:, 0]))
    return 1.0 / inv_bw, alpha


def build_profile(results: list[dict], *, name: str, wall_s: float, quantile: float = 0.5) -> Cluster:
    """The cluster profile from every rank's measurements (``results[r]`` from ``measure``). Each
    timing is the ``quantile`` over repeats of the slowest rank: the median by default; a lower
    quantile describes a shared machine at its quieter moments."""
    world = len(results)

    def medians(kind: str) -> list[tuple[float, float]]:
        per_rank = [r["compute"][kind] for r in results]  # each rank: [(work, [seconds per repeat])]
        return [(entries[0][0], _slowest([ts for _, ts in entries], quantile)) for entries in zip(*per_rank)]

    overhead_ops, overhead_t = medians("overhead")[0]
    overhead = overhead_t / overhead_ops
    rates = {k: [w / max(t - overhead, 1e-12) for w, t in medians(k)] for k in ("matmul", "convolution", "elementwise", "reduction")}
    peak = max(rates["matmul"] + rates["convolution"])
    # A low-precision matmul ran the first float32 kernel's shape and layout: the peak scaled by its
    # speed against that kernel, so that the matmul efficiency carries over to it.
    # (Measurements without them, from older runs, leave peak_flops_by_dtype empty.)
    dtype_keys = [k for k in DTYPE_MATMULS if k in results[0]["compute"]]
    peak_by_dtype = {}
    for key in dtype_keys:
        ((work, t),) = medians(key)
        peak_by_dtype[DTYPE_MATMULS[key]] = peak * (work / max(t - overhead, 1e-12)) / rates["matmul"][0]
    # The memory bandwidth is that of the largest stream (its add, relu and copy come last):
    # memory-bound, where smaller streams may run from cache, faster (an efficiency can exceed 1).
    bandwidth = max(rates["elementwise"][-3:])
    compute_eff = {k: statistics.median(rates[k]) / peak for k in ("matmul", "convolution")}
    memory_eff = {k: statistics.median(rates[k]) / bandwidth for k in ("elementwise", "reduction")}
    links_raw: dict[str, list] = {}
    link_by = {}
    for kind in COLLECTIVES:
        groups = zip(*[r["collectives"][kind] for r in results])
        points = [(g[0][0], g[0][1], _slowest([ts for _, _, ts in g], quantile)) for g in groups]
        links_raw[kind] = [{"ranks": n, "bytes": s, "seconds": t} for n, s, t in points]
        link_by[kind] = _fit_link(points, kind, overhead)
    bw, lat = link_by["all_reduce"]
    # How much of an asynchronous collective hides under compute: 1 when the two run side by side,
    # 0 when they take turns (as gloo's reduction and the matmul do on cores the ranks share).
    if all("overlap" in r for r in results):
        t = {k: _slowest([r["overlap"][k] for r in results], quantile) for k in ("compute", "comm", "both")}
        overlap = min(1.0, max(0.0, (t["compute"] + t["comm"] - t["both"]) / min(t["compute"], t["comm"])))
    else:
        overlap = 1.0
        t = {}
    # A blocking collective inside a step: what each of the in-step all-reduces added to the
    # matmuls around it, beyond the alpha-beta time of the same all-reduce after a barrier, for each
    # segment length, and the median over the lengths (LinkSpec.in_step_latency); the same for the
    # large all-reduces, whose extra beyond the small ones' is their bytes moving slower
    # (LinkSpec.in_step_bandwidth_ratio; see the link below and docs/cost-model.md).
    in_step_t: dict = {}
    bandwidth_ratio = 1.0
    if all("in_step" in r for r in results):
        alone = collective_time("all_reduce", IN_STEP_BYTES, world, bw, lat) + overhead
        alone_large = collective_time("all_reduce", IN_STEP_LARGE_BYTES, world, bw, lat) + overhead
        keys = list(results[0]["in_step"])
        rows = [k.partition("@")[2] for k in keys if k.startswith("compute")]  # "" for one unnamed length
        extras, extras_large = [], []
        for r in rows:
            suffix = f"@{r}" if r else ""
            t_c = _slowest([res["in_step"]["compute" + suffix] for res in results], quantile)
            t_b = _slowest([res["in_step"]["both" + suffix] for res in results], quantile)
            extra_r = max(0.0, (t_b - t_c) / IN_STEP_COLLECTIVES - alone)
            in_step_t[f"compute{suffix}"], in_step_t[f"both{suffix}"] = t_c, t_b
            in_step_t[f"extra_per_collective{suffix}"] = extra_r
            extras.append(extra_r)
            if "large" + suffix in results[0]["in_step"]:
                t_l = _slowest([res["in_step"]["large" + suffix] for res in results], quantile)
                in_step_t[f"large{suffix}"] = t_l
                in_step_t[f"extra_per_large_collective{suffix}"] = max(0.0, (t_l - t_c) / IN_STEP_COLLECTIVES - alone_large)
                extras_large.append(in_step_t[f"extra_per_large_collective{suffix}"])
        in_step_t["extra_per_collective"] = statistics.median(extras)
        if extras_large:
            # extra(S) = latency + (1 / ratio - 1) x (the bandwidth term of S): fitted on the two sizes.
            in_step_t["extra_per_large_collective"] = statistics.median(extras_large)
            slope = (in_step_t["extra_per_large_collective"] - in_step_t["extra_per_collective"])
            term = (collective_time("all_reduce", IN_STEP_LARGE_BYTES, world, bw, 0.0)
                    - collective_time("all_reduce", IN_STEP_BYTES, world, bw, 0.0))
            bandwidth_ratio = 1.0 / (1.0 + max(0.0, slope) / term) if term > 0 else 1.0
            in_step_t["bandwidth_ratio"] = bandwidth_ratio
    # Optimizer updates (measurements from before they were taken have none: the roofline prices them).
    opt_raw: dict[str, list] = {}
    opt_fit: dict[str, tuple[float, float]] = {}
    if all("optimizers" in r for r in results):
        for optimizer in results[0]["optimizers"]:
            per_rank = [r["optimizers"][optimizer] for r in results]
            points = [(entries[0][0], _slowest([ts for _, ts in entries], quantile)) for entries in zip(*per_rank)]
            opt_raw[optimizer] = [{"bytes": b, "seconds": t} for b, t in points]
            opt_fit[optimizer] = _fit_optimizer(points)
    # The runtime's hand-over of each parameter's gradient (measurements from before it was taken
    # have none: 0, as before).
    handoff = _slowest([r["handoff"] for r in results], quantile) if all("handoff" in r for r in results) else 0.0
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    first = results[0]
    device_name = f"{first['device']}-rank ({platform.processor() or platform.machine()}, {first['threads']} threads)"
    device = DeviceSpec(
        name=device_name,
        peak_flops=peak,
        memory_bytes=float(ram // world) if first["device"] == "cpu" else float(torch.cuda.get_device_properties(0).total_memory),
        memory_bandwidth=bandwidth,
        compute_efficiency=compute_eff["matmul"],
        memory_efficiency=memory_eff["elementwise"],
        kernel_overhead_s=overhead,
        compute_efficiency_by_class=compute_eff,
        memory_efficiency_by_class=memory_eff,
        overlap_efficiency=overlap,
        peak_flops_by_dtype=peak_by_dtype,
        optimizer_param_s={k: v[0] for k, v in opt_fit.items()},
        optimizer_byte_s={k: v[1] for k, v in opt_fit.items()},
        gradient_handoff_s=handoff,
    )
    # Every blocking collective inside a step pays the in-step figure (docs/cost-model.md, "Inside a
    # step"); 0 where the measurement is absent (profiles of older measurements).
    link = LinkSpec(bw, lat, {k: v[0] for k, v in link_by.items()}, {k: v[1] for k, v in link_by.items()},
                    in_step_latency=in_step_t.get("extra_per_collective", 0.0), in_step_bandwidth_ratio=bandwidth_ratio)
    raw = {k: [{"work": w, "seconds": t} for w, t in medians(k)]
           for k in ("overhead", "matmul", "convolution", "elementwise", "reduction", *dtype_keys)}
    extra = {"calibration": {
        "ranks": world, "threads_per_rank": first["threads"], "quantile": quantile, "backend": first["backend"], "torch": torch.__version__,
        "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(wall_s, 1),
        "compute": raw, "collectives": links_raw, "overlap": t, "in_step": in_step_t, "optimizers": opt_raw,
        "gradient_handoff_s": handoff,
    }}
    source = f"python -m fxpar calibrate on {platform.node()} ({world} ranks, {first['backend']}) {extra['calibration']['date']}"
    return Cluster(name, device, world, (link,), source=source, extra=extra)


def model_kernel_calls(factories: Sequence[str], meshes: Sequence[tuple[int, ...]]) -> dict[str, tuple]:
    """``kernel_calls`` of every model ``factories`` name (``MODULE:FACTORY``, a function returning
    ``(model, example_inputs)``, the global batch) on every mesh of ``meshes``."""
    from fxpar.cli_plan import load_factory
    from fxpar.errors import PlanOptionError
    from fxpar.planner import capture_and_annotate

    calls: dict[str, tuple] = {}
    for spec in factories:
        made = load_factory(spec)()
        if not (isinstance(made, (tuple, list)) and len(made) == 2):
            raise PlanOptionError(f"{spec} returned {type(made).__name__}; it must return (model, example_inputs)")
        gm = capture_and_annotate(made[0], made[1])
        for mesh in meshes:
            calls.update(kernel_calls(gm, tuple(mesh)))
    return calls


def _measure_rank(rank: int, sizes: Sizes, factories: Sequence[str], meshes: Sequence[tuple[int, ...]]) -> dict:
    """``measure``, then (with ``factories``) the models' kernels by signature, on every rank at once.
    The models are captured first, so that one that does not capture fails before the measurements."""
    calls = model_kernel_calls(factories, meshes) if factories else {}
    out = measure(rank, sizes)
    if factories:
        _say(rank, f"kernels of {', '.join(factories)}: {len(calls)} matmul and convolution signatures on meshes "
                   f"{', '.join('x'.join(map(str, m)) for m in meshes)}")
        out = {**out, "kernels": measure_kernels(calls, repeats=sizes.repeats)}
    return out


def calibrate(*, max_ranks: int = 2, quick: bool = False, name: str = "calibrated", quantile: float = 0.5,
              models: Sequence[str] = (), meshes: Sequence[Sequence[int]] | None = None) -> Cluster:
    """Measure this machine on ``max_ranks`` local gloo ranks (or the running torchrun group).

    ``models``: ``MODULE:FACTORY`` names of functions returning ``(model, example_inputs)``; the
    matmul and convolution kernels of their steps, at every per-device shape any strategy gives them
    on ``meshes`` (default: the 1-D mesh of all ranks), are timed too and kept in the profile
    (``DeviceSpec.measured_kernel_s``), so that planning those models prices them as measured."""
    sizes = QUICK if quick else Sizes()
    start = time.perf_counter()
    torchrun = dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    if torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    num_ranks = dist.get_world_size() if torchrun else max_ranks
    shapes = [tuple(int(s) for s in m) for m in (meshes or [(num_ranks,)])]
    if models and not torchrun:
        # A bad name or a model that does not capture fails here, not as a RankError from the ranks
        # (under torchrun this process is a rank: _measure_rank captures first).
        model_kernel_calls(models, shapes)
    if torchrun:
        mine = _measure_rank(dist.get_rank(), sizes, list(models), shapes)
        results: list = [None] * dist.get_world_size()
        dist.all_gather_object(results, mine)
    else:
        from fxpar.launch import launch

        print(f"[calibrate] starting {max_ranks} local gloo ranks", flush=True)
        results = launch(_measure_rank, max_ranks, sizes, list(models), shapes)
    profile = build_profile(results, name=name, wall_s=time.perf_counter() - start, quantile=quantile)
    if models:
        profile = with_measured_kernels(profile, [r["kernels"] for r in results], quantile)
    return profile


def summary(c: Cluster) -> str:
    d, link = c.device, c.links[0]
    ce, me = {k: d.efficiencies(k)[0] for k in OP_CLASSES}, {k: d.efficiencies(k)[1] for k in OP_CLASSES}
    lines = [f"{c.name}: {c.num_devices} x {d.name}",
             f"  peak {d.peak_flops / 1e9:.1f} GFLOP/s; efficiency matmul {ce['matmul']:.2f}, convolution {ce['convolution']:.2f}",
             "  peak by dtype: " + (", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in d.peak_flops_by_dtype.items())
                                    or "none measured (every dtype at the float32 peak)"),
             f"  memory bandwidth {d.memory_bandwidth / 1e9:.1f} GB/s; efficiency elementwise {me['elementwise']:.2f}, "
             f"reduction {me['reduction']:.2f}",
             f"  per-op overhead {d.kernel_overhead_s * 1e6:.1f} us; memory per rank {d.memory_bytes / 2**30:.1f} GiB; "
             f"overlap of async collectives with compute {d.overlap_efficiency:.2f}"]
    lines += [f"  {k:<15} update {d.optimizer_param_s[k] * 1e6:7.1f} us per parameter + {d.optimizer_byte_s[k] * 1e9:.3f} ns per byte"
              for k in d.optimizer_param_s]
    lines += [f"  gradient hand-over {d.gradient_handoff_s * 1e6:7.1f} us per trainable parameter and step"]
    if d.measured_kernel_s:
        lines += [f"  {len(d.measured_kernel_s)} matmul and convolution kernels timed by signature (--model)"]
    lines += [f"  {k:<15} bus bandwidth {link.figures(k)[0] / 1e9:8.3f} GB/s, latency {link.figures(k)[1] * 1e6:8.1f} us per hop"
              for k in COLLECTIVES]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="fxpar-profile.json", help="where to write the profile (default %(default)s)")
    parser.add_argument("--max-ranks", type=int, default=max(2, min(8, os.cpu_count() or 2)),
                        help="measure collectives on 2..N local ranks (default: cores, at most 8)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke test, rough figures)")
    parser.add_argument("--name", default="calibrated", help="the profile's cluster name")
    parser.add_argument("--quantile", type=float, default=0.5,
                        help="which quantile of the repeated timings to keep: 0.5 (default) the median; a lower "
                             "one (0.25) describes a machine shared with other jobs at its quieter moments")
    parser.add_argument("--model", action="append", default=[], metavar="MODULE:FACTORY",
                        help="also time this model's matmul and convolution kernels by signature (a function returning "
                             "(model, example_inputs)); repeat for several models")
    parser.add_argument("--mesh", action="append", default=[], metavar="SHAPE",
                        help="with --model: the mesh whose per-device shapes are timed, e.g. 2 or 2x2 (repeatable; "
                             "default: one axis of all ranks)")


def run(args) -> None:
    from fxpar.errors import ClusterSpecError

    if args.max_ranks < 2:
        raise ClusterSpecError(f"--max-ranks is {args.max_ranks}; collectives need at least 2 ranks")
    if not 0.0 <= args.quantile <= 1.0:
        raise ClusterSpecError(f"--quantile is {args.quantile}; give a fraction in [0, 1] (0.5 is the median)")
    from fxpar.cli_plan import parse_mesh

    meshes = [parse_mesh(m) for m in args.mesh] or None
    profile = calibrate(max_ranks=args.max_ranks, quick=args.quick, name=args.name, quantile=args.quantile,
                        models=args.model, meshes=meshes)
    if not dist.is_initialized() or dist.get_rank() == 0:
        profile.save(args.out)
        print(summary(profile))
        wall = profile.extra["calibration"]["wall_s"]
        print(f"wrote {args.out} after {wall:.0f} s; use it with fxpar.plan(..., cluster=fxpar.Cluster.load({args.out!r}))")



def kernel_calls(gm: torch.fx.GraphModule, mesh_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Every matmul and convolution kernel (``fxpar.cost.MEASURED_CLASSES``) the captured and
    annotated step ``gm`` can run on one device of a mesh of ``mesh_shape``, over every strategy
    the planner may choose for each node: ``fxpar.cost.kernel_key`` -> (op, args), with each
    tensor argument as (per-device shape, dtype). What ``measure_kernels`` times."""
    from fxpar.cost import MEASURED_CLASSES, kernel_key, op_class
    from fxpar.placement import local_shape
    from fxpar.rules.registry import input_source, output_values, tensor_arg_nodes
    from fxpar.solve.strategies import node_strategies

    calls: dict[str, tuple] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("fxpar_is_view") or op_class(node) not in MEASURED_CLASSES:
            continue
        sources = [input_source(node, j) for j in range(len(tensor_arg_nodes(node)))]
        for strategy in node_strategies(node, tuple(mesh_shape)):
            key = kernel_key(node, strategy, tuple(mesh_shape))
            if key in calls:
                continue
            tensors = iter(range(len(sources)))

            def arg(a, strategy=strategy, tensors=tensors, sources=sources):
                if isinstance(a, torch.fx.Node):
                    j = next(tensors)
                    u, i = sources[j]
                    t = output_values(u)[i]
                    return ("tensor", tuple(local_shape(tuple(t.shape), strategy.inputs[j], tuple(mesh_shape))), t.dtype)
                if isinstance(a, (list, tuple)):
                    return type(a)(arg(b) for b in a)
                return a

            calls[key] = (node.target, tuple(arg(a) for a in node.args))
    return calls


def measure_kernels(calls: dict[str, tuple], *, repeats: int = 5, device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds per repeat of every kernel in ``calls`` (``kernel_calls``), on random inputs of its
    per-device shapes, after one warm-up call. Call it on every rank at once (as in training, so
    that the ranks' contention for the machine is in the figures) and pass the results of all ranks
    to ``with_measured_kernels``."""
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))

    def build(a):
        if isinstance(a, tuple) and len(a) == 3 and a[0] == "tensor":
            return torch.randn(a[1], dtype=a[2], device=device) if a[2].is_floating_point else torch.zeros(a[1], dtype=a[2], device=device)
        if isinstance(a, (list, tuple)):
            return type(a)(build(b) for b in a)
        return a

    out = {}
    for key, (target, args) in calls.items():
        real = tuple(build(a) for a in args)
        out[key] = _time(lambda target=target, real=real: target(*real), device, repeats)
    return out


def with_measured_kernels(cluster: Cluster, per_rank: list[dict[str, list[float]]], quantile: float = 0.5) -> Cluster:
    """``cluster`` with its device's ``measured_kernel_s`` extended by the kernels every rank timed
    (``measure_kernels``): each the ``quantile`` over repeats of the slowest rank, as every other
    timing of a profile."""
    from dataclasses import replace

    table = dict(cluster.device.measured_kernel_s)
    for key in per_rank[0]:
        table[key] = max(_slowest([r[key] for r in per_rank], quantile), 1e-9)
    return replace(cluster, device=replace(cluster.device, measured_kernel_s=table))
