"""From the rewritten per-rank graph to the function a rank calls every step.

torch's bucketing passes, one pass of fxpar's own, and torch's code generator:

- ``bucket_collectives`` merges the gradient all-reduces (and reduce-scatters) of one mesh axis into
  buckets with torch Inductor's FX bucketing passes (``torch._inductor.fx_passes.bucketing``:
  ``bucket_all_reduce``, ``bucket_reduce_scatter``), as DDP packs gradients into buckets: one
  collective per bucket instead of one per parameter. It runs on the per-rank graph before codegen,
  so the eager step and the simulator run the same bucketed graph as the compiled one.
- ``channels_last_inputs`` (fxpar's own, for Inductor on CPU) makes a convolution's image input
  channels-last at the start of the step, so that its activations are traced in the layout
  Inductor runs CPU convolutions in (see its docstring: Inductor keeps a joint graph's
  ``convolution_backward`` inputs in their traced layout, which costs a copy per layer otherwise).
- ``gloo_all_gathers`` (fxpar's own, for gloo groups) issues each all-gather as an equivalent
  all-to-all: torch 2.13's gloo backend corrupts memory when several ``all_gather_into_tensor``
  are in flight at once (see its docstring), which a step whose collectives overlap compute has.
- ``compile_step`` compiles the graph with Inductor (``torch._inductor.compile_fx.compile_fx``:
  C++/OpenMP kernels on CPU, Triton on GPU) or runs it as it is (``codegen="eager"``). Inductor keeps
  its compiled artifacts in its on-disk FX graph cache, so a restart with the same graph loads them
  instead of compiling again. Where no C++ compiler is found on a CPU run, the step runs eagerly
  with a ``FallbackWarning``. Inductor's ``sink_waits`` pass places each collective's wait where its
  result is first read (``INDUCTOR_OPTIONS``). Where Inductor's vectorized C++ code generation fails on a graph
  (torch 2.13's CPU backend asserts on some int64 ``where`` kernels, such as the ones a split
  vocabulary's target masking makes), the graph is compiled again without vectorization
  (``cpp.simdlen=1``), with a ``FallbackWarning`` naming the error.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.fx import GraphModule

from fxpar.errors import CodegenError, FallbackWarning

__all__ = ["CODEGENS", "CodegenError", "bucket_collectives", "channels_last_inputs", "compile_step", "cpp_compiler",
           "gloo_all_gathers"]

CODEGENS = ("inductor", "eager")
# DDP's default bucket size. DDP caps its first bucket (the gradients the backward produces
# first) at 1 MB so that their collective starts while the rest of the backward computes; on 2 gloo
# ranks sharing 2 CPU cores that costs more latency than it hides (the toy transformer: 86.8 ms with
# one bucket, 92.2 ms with a 1 MB first bucket, 94.6 ms with 0.25 MB, docs/benchmarks.md), so the
# first bucket is as large as the others unless asked.
BUCKET_CAP_MB = 25.0
FIRST_BUCKET_CAP_MB = BUCKET_CAP_MB

# Inductor's scheduler orders its kernels itself and, left alone, waits for every collective right
# after issuing it. Its own ``sink_waits`` pass moves each wait to the first kernel that reads the
# result, so a collective the rewrite issues early (fxpar.passes.schedule) completes while the
# kernels between run, as in the eager step. Its ``raise_comms`` pass is not used: it would issue a
# parameter's all-gather (ZeRO-3) at the start of the step, holding every gathered parameter at once.
INDUCTOR_OPTIONS = {"reorder_for_compute_comm_overlap": True, "reorder_for_compute_comm_overlap_passes": ["sink_waits"]}


def check_codegen(codegen: str) -> str:
    if codegen not in CODEGENS:
        raise CodegenError(f"codegen={codegen!r} is not one of {list(CODEGENS)}; use 'inductor' (compiled, the default) or 'eager'")
    return codegen


def bucket_collectives(gm: GraphModule, inputs: Sequence[torch.Tensor], cap_mb: float | None = None,
                       first_cap_mb: float | None = None) -> GraphModule:
    """Merge independent all-reduces and reduce-scatters of one group and dtype into buckets of at
    most ``cap_mb`` MB (default ``BUCKET_CAP_MB``), the first of at most ``first_cap_mb`` MB
    (default ``FIRST_BUCKET_CAP_MB``), as DDP does (in place; the graph's collectives must name
    existing process groups). ``inputs``: tensors of the placeholders' shapes and dtypes (their
    values are not read)."""
    from torch._inductor.fx_passes.bucketing import bucket_all_reduce, bucket_reduce_scatter
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    # The passes read every node's value metadata (shape, dtype).
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*inputs)

    cap_mb = BUCKET_CAP_MB if cap_mb is None else cap_mb
    first_cap_mb = FIRST_BUCKET_CAP_MB if first_cap_mb is None else first_cap_mb

    def cap(bucket_id: int) -> float:
        return first_cap_mb if bucket_id == 0 else cap_mb

    bucket_all_reduce(gm, cap)
    bucket_reduce_scatter(gm, cap)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def channels_last_inputs(gm: GraphModule, inputs: Sequence[torch.Tensor]) -> GraphModule:
    """Give every 4-D floating-point placeholder that a convolution reads a channels-last copy
    (in place), so that the step's activations are traced channels-last.

    Inductor on CPU runs convolutions channels-last (its layout optimization), but a value that
    ``convolution_backward`` also reads, which in a joint forward+backward graph is every
    convolution's input, is fixed to the layout it was traced in, NCHW for NCHW images. Its kernel
    then writes it both ways: the first batch norm of the ResNet-18 of ``tools/benchlib.py`` wrote
    its ReLU's output three times (once NCHW, twice channels-last), and Inductor's kernels took
    19.3 ms of the step against 10.3 ms in DDP + torch.compile's separate forward and backward
    graphs. With the images channels-last from the start, every traced activation is, and the step
    took 56.8 against 66.2 ms (docs/benchmarks.md). The copy (the images, once a step) is not in
    the cost model. Reads and writes ``node.meta["val"]`` where a placeholder has one (the copy's
    is the channels-last value); ``inputs``: tensors of the placeholders' shapes and dtypes.

    Before: ``convolution(x, w, ...)``; after:
    ``x_cl = clone(x, memory_format=torch.channels_last); convolution(x_cl, w, ...)``.
    """
    aten = torch.ops.aten
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    changed = False
    for node, value in zip(placeholders, inputs):
        if not (isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()):
            continue
        if not any(u.target is aten.convolution.default and u.args[0] is node for u in node.users):
            continue
        with gm.graph.inserting_after(node):
            copy = gm.graph.call_function(aten.clone.default, (node,), {"memory_format": torch.channels_last})
        if isinstance(node.meta.get("val"), torch.Tensor):
            copy.meta["val"] = node.meta["val"].clone(memory_format=torch.channels_last)
        node.replace_all_uses_with(copy, delete_user_cb=lambda user, copy=copy: user is not copy)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def gloo_all_gathers(gm: GraphModule, device: torch.device) -> GraphModule:
    """Issue every all-gather of a gloo group as the all-to-all that computes it (in place).

    torch 2.13's gloo backend corrupts the heap when several ``all_gather_into_tensor`` are in
    flight at once (its ``allgather_into_tensor_coalesced`` work; a ``free(): invalid pointer``, a
    ``malloc_consolidate`` abort or a segmentation fault in a gloo worker thread, minutes into a
    run). A step whose collectives overlap its compute has several in flight: the batch's
    all-gathers start at its beginning (``fxpar.passes.schedule``), batch norm's statistics and
    ZeRO-3's parameter gathers while gradients synchronize. On 2 gloo ranks, 12 all-gathers in
    flight between matmuls crashed 9 of 18 runs of 3,000 rounds; the same gathers as all-to-alls
    crashed none of 6, nor did all-reduces, reduce-scatters or all-to-alls in flight, nor
    all-gathers waited for one at a time (docs/design.md, Codegen). An all-gather over ``n`` ranks
    of ``x`` (``d`` rows) is the all-to-all of ``n`` copies of ``x`` with ``d`` rows to and from
    every rank: rank ``i``'s copy lands at block ``i``, as in the all-gather. It sends the same
    bytes; the copies cost one extra write of the output's size. Groups on other backends (NCCL,
    fake groups) keep their all-gathers. Reads ``node.meta["val"]`` of each all-gather's input
    (``bucket_collectives`` sets it). Eager calls of ``fxpar.runtime.steps.apply_steps`` (a
    ``state_dict``'s gathers, calibration's timings) gather the same way on gloo.

    Before: ``all_gather_into_tensor(x, 2, g)``; after:
    ``all_to_all_single(repeat(x, [2, 1, ...]), [d, d], [d, d], g)``.
    """
    from fxpar.runtime.steps import all_gather_as_all_to_all, runs_on_gloo

    funcol = torch.ops._c10d_functional
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not funcol.all_gather_into_tensor.default:
            continue
        x, n, group = node.args
        value = x.meta.get("val")
        assert isinstance(value, torch.Tensor), f"{x.name} has no value metadata (bucket_collectives sets it)"
        if value.dim() == 0 or not runs_on_gloo(group, device):
            continue
        with gm.graph.inserting_before(node):
            swap = all_gather_as_all_to_all(x, value.dim(), int(value.shape[0]), n, group,
                                            lambda target, *args: gm.graph.call_function(target, args))
        if "val" in node.meta:
            swap.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(swap)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use on CPU (``$CXX``, else the first of g++, c++, clang++ on
    the PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


class CompiledStep:
    """Calls the per-rank graph; with Inductor, compiles it on the first call (``compile_s`` holds
    the seconds that took, 0 for eager)."""

    def __init__(self, gm: GraphModule, codegen: str):
        self.gm = gm
        self.codegen = codegen
        self.compile_s = 0.0
        self._fn: Callable | None = gm if codegen == "eager" else None

    def __call__(self, *args: torch.Tensor) -> Sequence[torch.Tensor]:
        if self._fn is None:
            start = time.perf_counter()
            self._fn = _inductor(self.gm, list(args))
            self.compile_s = time.perf_counter() - start
        return self._fn(*args)


def _inductor(gm: GraphModule, args: list[torch.Tensor]) -> Callable:
    """``compile_fx(gm, args)``; on CPU, where the vectorized C++ code generation fails, again
    without vectorization (with a ``FallbackWarning``)."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.exc import InductorError

    try:
        with config.patch(INDUCTOR_OPTIONS):
            return compile_fx(gm, args)
    except InductorError as exc:
        if any(a.device.type != "cpu" for a in args if isinstance(a, torch.Tensor)) or config.cpp.simdlen == 1:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"Inductor's vectorized C++ code generation failed on this rank's step ({first[:200]}); "
                      "compiled again without vectorization (cpp.simdlen=1)", FallbackWarning, stacklevel=4)
        with config.patch({**INDUCTOR_OPTIONS, "cpp.simdlen": 1}):
            return compile_fx(gm, args)


def build_rank_step(gm: GraphModule, assignment: dict, rank_mesh, local_inputs: Sequence[torch.Tensor], *,
                    codegen: str, device: torch.device, batch_norm: str = "global",
                    output_specs=None) -> tuple[GraphModule, CompiledStep]:
    """(this rank's graph, its step function): ``gm`` rewritten under ``assignment`` for
    ``rank_mesh`` (a ``fxpar.runtime.steps.RankMesh``: this rank's coordinates and the process
    groups of its axes), its collectives bucketed (its all-gathers on gloo groups issued as
    all-to-alls, ``gloo_all_gathers``), and its code prepared by ``codegen``.
    ``local_inputs``: tensors of this rank's input shapes and dtypes (their values are not read).
    What ``FxparModule`` runs and what ``fxpar.runtime.simulate.run_plan_rank`` checks."""
    from fxpar.passes.rewrite import rewrite

    local = rewrite(gm, assignment, rank_mesh.shape, coords=rank_mesh.coords, group_names=rank_mesh.group_names,
                    device=device, output_specs=output_specs, batch_norm=batch_norm)
    bucket_collectives(local, local_inputs)
    gloo_all_gathers(local, device)
    if codegen == "inductor" and device.type == "cpu":
        channels_last_inputs(local, local_inputs)
    return local, compile_step(local, codegen, device)


def compile_step(gm: GraphModule, codegen: str, device: torch.device) -> CompiledStep:
    """The step function for ``codegen`` (``"inductor"`` or ``"eager"``)."""
    check_codegen(codegen)
    if codegen == "inductor" and device.type == "cpu" and cpp_compiler() is None:
        warnings.warn(
            "codegen='inductor' needs a C++ compiler on CPU and none was found (set $CXX or install g++); "
            "the step runs eagerly (codegen='eager')", FallbackWarning, stacklevel=3)
        codegen = "eager"
    return CompiledStep(gm, codegen)
