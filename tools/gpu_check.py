"""One short check of fxpar's runtime on a CUDA device: capture, plan, rewrite, compile with
Inductor (Triton) and run one training step on one rank, and run the same step's rank graphs for
simulated ranks under ``LocalTensorMode`` on the device; every result is compared with eager
autograd on the same device, and the figures are printed.

    python tools/gpu_check.py                      # CUDA; exits 0 with a message where there is none
    python tools/gpu_check.py --device cpu         # the same checks on the CPU (C++ Inductor)
    python tools/gpu_check.py --models mlp --steps 20 --mesh 2,2

For each model (``benchlib.small_models``):

- ``1 rank``: the step is captured (``capture_and_annotate``) with the model on the device, planned
  for a mesh of one device, rewritten (``fxpar.passes.rewrite``), compiled (``compile_step``,
  ``codegen="inductor"``) and run; printed: the compile time, the median step time of the compiled
  step and of eager autograd (forward and backward, ``--steps`` steps after 3 warm-up steps,
  synchronized), and the largest error of the loss and of the gradients against eager autograd.
- ``simulated ranks``: fxpar's plan for ``--mesh`` (under the ``a100-nvlink-8`` preset) run by
  ``fxpar.runtime.simulate.simulate_plan`` on the device: every rank's graph, the functional
  collectives executed by ``LocalTensorMode``; printed: the largest error of every rank's loss and
  gradient shards against eager autograd, and the wall time of the simulated step.

The exit status is 0 when every check ran and matched (or when no CUDA device is present and
``--device cuda``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

import fxpar  # noqa: E402
from fxpar.passes.capture import step_outputs  # noqa: E402
from fxpar.passes.rewrite import rewrite  # noqa: E402
from fxpar.planner import capture_and_annotate, plan_graph  # noqa: E402
from fxpar.runtime.codegen import bucket_collectives, compile_step  # noqa: E402
from fxpar.runtime.simulate import shard_for_ranks, simulate_plan  # noqa: E402

# float32 on both sides; TF32 matmuls would differ from eager at the 1e-3 level.
RTOL, ATOL = 1e-3, 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, steps: int) -> float:
    """Median seconds of ``fn`` over ``steps`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reference(model, inputs):
    """Eager autograd on the device: the loss and every trainable parameter's gradient."""
    for p in model.parameters():
        p.grad = None
    loss = model(*inputs)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item() / (1.0 + want.float().abs().max().item())


def check_model(name: str, device: torch.device, steps: int, mesh: tuple[int, ...]) -> list[str]:
    """Runs both checks for one model, prints their figures, returns the failures."""
    failures = []
    model, inputs = benchlib.build(name)
    model = model.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    ref_loss, ref_grads = _reference(model, inputs)
    eager_s = _timed(lambda: _reference(model, inputs), device, steps)

    # 1 rank: capture, plan, rewrite, compile, run.
    gm = capture_and_annotate(model, inputs)
    plan, _ = plan_graph(gm, cluster=fxpar.preset("cpu-local", num_devices=1) if device.type == "cpu"
                         else fxpar.preset("a100-nvlink-8", num_devices=1), mesh_shape=(1,))
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    state = [p.detach() for p in model.parameters() if not p.requires_grad] + [b.detach().clone() for b in model.buffers()]
    args = [*params, *state, *inputs]
    # The rank graph's collectives (of one rank here) need a process group: one of one rank.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = init_device_mesh(device.type, (1,)).get_group(0).group_name
        local = rewrite(gm, plan.assignment(gm), (1,), group_names=(group,), device=device)
        bucket_collectives(local, args)
        step = compile_step(local, "inductor", device)
        with torch.no_grad():
            loss, *outs = step(*args)
            _sync(device)
            step_s = _timed(lambda: step(*args), device, steps)
    finally:
        dist.destroy_process_group()
    loss_err = _max_err(loss, ref_loss)
    grad_err = max(_max_err(g, w) for g, w in zip(outs[: len(ref_grads)], ref_grads))
    ok = loss_err <= RTOL and grad_err <= RTOL
    print(f"{name} 1 rank ({step.codegen}): compile {step.compile_s:.1f} s, step {step_s * 1e3:.2f} ms "
          f"(eager autograd {eager_s * 1e3:.2f} ms, {eager_s / step_s:.2f}x), "
          f"error loss {loss_err:.1e} grads {grad_err:.1e} {'ok' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        failures.append(f"{name}: 1-rank compiled step differs from eager autograd")

    # Simulated ranks: fxpar's plan for the mesh, every rank's graph under LocalTensorMode.
    num = 1
    for s in mesh:
        num *= s
    sim_model, sim_inputs = benchlib.build(name)
    if sim_inputs[0].shape[0] % num:
        print(f"{name} simulated {list(mesh)}: skipped (batch {sim_inputs[0].shape[0]} does not split {num} ways)")
        return failures
    sim_model = sim_model.to(device)
    sim_inputs = tuple(t.to(device) for t in sim_inputs)
    gm = capture_and_annotate(sim_model, sim_inputs)
    plan, _ = plan_graph(gm, cluster=fxpar.preset("a100-nvlink-8", num_devices=num), mesh_shape=mesh)
    assignment = plan.assignment(gm)
    full = [p.detach() for p in sim_model.parameters() if p.requires_grad]
    full += [p.detach() for p in sim_model.parameters() if not p.requires_grad] + [b.detach().clone() for b in sim_model.buffers()]
    full += list(sim_inputs)
    start = time.perf_counter()
    results = simulate_plan(gm, assignment, mesh, full)
    _sync(device)
    sim_s = time.perf_counter() - start
    _, grads, _ = step_outputs(gm)
    worst = 0.0
    for rank, (loss, *outs) in enumerate(results):
        worst = max(worst, _max_err(loss, ref_loss))
        for i, (_, param) in enumerate(grads):
            want = shard_for_ranks(ref_grads[i], assignment[param].outputs[0], mesh)[rank]
            worst = max(worst, _max_err(outs[i], want))
    ok = worst <= RTOL
    print(f"{name} simulated {list(mesh)} ({benchlib.param_summary(plan)}): {len(results)} ranks in {sim_s:.2f} s, "
          f"largest error {worst:.1e} {'ok' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        failures.append(f"{name}: simulated ranks differ from eager autograd")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--models", default="mlp,transformer")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mesh", default="2", help="simulated mesh, e.g. 2 or 2,2")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. "
              "Run with --device cpu to exercise the same checks on the CPU.")
        return 0
    mesh = tuple(int(s) for s in args.mesh.split(","))
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {what}, torch {torch.__version__}, mesh simulated {list(mesh)}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures = []
    for name in args.models.split(","):
        try:
            failures += check_model(name, device, args.steps, mesh)
        except Exception as exc:  # noqa: BLE001  (report every model, then fail)
            traceback.print_exc()
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
