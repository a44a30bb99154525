"""The cost model: seconds for compute and for communication, bytes for memory, from one place.

Compute (per node, per device), for an op of class ``c`` (``op_class``: matmul, convolution,
elementwise, reduction) computing in dtype ``d`` (``compute_dtype``)::

    max(flops / (peak(d) * compute_eff(c)), bytes / (mem_bw * memory_eff(c))) + kernel_overhead

Views and getitems (one output of a multi-output op) cost nothing. FLOPs come from the annotate pass (``torch.utils.flop_counter``;
``attention_flops`` for the CPU attention kernels it does not count); the
per-device share shrinks by every mesh axis on which the strategy shards some tensor of the op;
``bytes`` are the per-device sizes of the op's inputs and outputs, each at its own element size.
The efficiencies are the device's (``DeviceSpec.efficiencies``), per class where a profile gives
them. ``peak(d)`` is ``DeviceSpec.peak_flops_for(d)``, where ``d`` is the dtype of the op's
floating-point inputs (a bfloat16 ``mm`` under autocast computes in bfloat16), and float32 becomes
``"tf32"`` for the classes ``tf32_classes()`` names when the cost model is built.

On a device whose ``convolution_algorithms`` is ``"cudnn"`` (the GPU presets) a convolution is
priced as the cuDNN calls it makes (forward; backward data, filter, bias), each the cheapest of
implicit GEMM (the roofline above) and the Winograd algorithms cuDNN offers for its shape
(``CostModel.conv_algorithms``; docs/cost-model.md, "Convolutions on GPUs").

Resharding runs the steps of ``fxpar.reshard``; each collective costs the alpha-beta time below,
each step (collective or local slice) one kernel overhead, and the copies a step makes on the
device (a local slice, the transposition of a non-leading dim before and after a collective) are
priced as memory traffic.

Communication (alpha-beta, ring, per mesh axis; ``docs/cost-model.md``), n devices on the axis,
B bus bandwidth, alpha per-hop latency (``LinkSpec.figures(kind)``; per collective where a
calibrated profile gives them):

  all-reduce      2(n-1) alpha + 2(n-1)/n * S/B   (S: bytes per device)
  all-gather      (n-1) alpha + (n-1)/n * S/B     (S: gathered bytes per device)
  reduce-scatter  (n-1) alpha + (n-1)/n * S/B     (S: input bytes per device)
  all-to-all      (n-1) alpha + (n-1)/n * S/B     (S: bytes per device)
  broadcast       ceil(log2 n) alpha + S/B        (S: bytes per device)
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Node

from fxpar.cluster import Cluster, dtype_name
from fxpar.placement import Shard, Spec, local_shape, num_pieces
from fxpar.reshard import reshard_steps, step_bytes
from fxpar.rules.registry import OpStrategy, input_source, op_facts, output_values, tensor_arg_nodes
from fxpar.solve.strategies import graph_batch_norm

aten = torch.ops.aten

# The op classes whose kernels ``fxpar.calibrate.measure_kernels`` times one by one: library calls
# (BLAS, oneDNN, cuBLAS, cuDNN) that the compiled runtime calls as they are, not fused kernels.
MEASURED_CLASSES = ("matmul", "convolution")


def kernel_key(node: Node, strategy: OpStrategy, mesh_shape: tuple[int, ...]) -> str:
    """How ``DeviceSpec.measured_kernel_s`` names the kernel ``node`` runs under ``strategy``: the
    aten op, each argument in order (a tensor as its per-device shape and dtype, anything else as
    itself), e.g. ``"aten.mm.default((256, 1024):float32, (1024, 1024):float32)"``."""
    tensors = iter(range(len(tensor_arg_nodes(node))))

    def arg(a) -> str:
        if isinstance(a, Node):
            j = next(tensors)
            u, i = input_source(node, j)
            t = output_values(u)[i]
            return f"{tuple(local_shape(tuple(t.shape), strategy.inputs[j], mesh_shape))}:{dtype_name(t.dtype)}"
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(arg(b) for b in a) + "]"
        return repr(a)

    return f"{node.target}({', '.join(arg(a) for a in node.args)})"


def op_class(node: Node) -> str:
    """The class whose efficiencies price ``node``: matmul, convolution, reduction or elementwise,
    as the op's registration says (``fxpar.rules.registry.OpFacts.cost_class``)."""
    return op_facts(node.target).cost_class


def tf32_classes() -> frozenset[str]:
    """The op classes whose float32 kernels torch's settings let run on TF32 tensor cores now:
    ``matmul`` when ``torch.backends.cuda.matmul.allow_tf32`` is set (as
    ``torch.set_float32_matmul_precision("high")`` or ``"medium"`` sets it; off by default),
    ``convolution`` when ``torch.backends.cudnn.allow_tf32`` is set (on by default)."""
    allowed = {"matmul": torch.backends.cuda.matmul.allow_tf32, "convolution": torch.backends.cudnn.allow_tf32}
    return frozenset(k for k, on in allowed.items() if on)


def compute_dtype(ins: list, outs: list) -> torch.dtype | None:
    """The dtype an op computes in: that of its first floating-point tensor input (of its first
    floating-point output for an op without one); None when it has neither."""
    for t in (*ins, *outs):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return None


# torch.utils.flop_counter counts the attention kernels of CUDA (flash, memory-efficient, cuDNN)
# and not the CPU flash kernel, which computes the same matrix products: those are counted by the
# formulas torch registers for the CUDA kernels (``sdpa_flop_count``: Q K^T and P V;
# ``sdpa_backward_flop_count``: the scores recomputed and the four products of the gradients).
CPU_ATTENTION = (aten._scaled_dot_product_flash_attention_for_cpu.default,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward.default)


def attention_flops(node: Node) -> int:
    """FLOPs of a CPU flash-attention node (forward or backward) on the graph's shapes, which
    ``torch.utils.flop_counter`` counts as 0; 0 for any other node."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    if node.op != "call_function" or node.target not in CPU_ATTENTION:
        return 0
    shapes = [tuple(a.meta["val"].shape) for a in node.args[:4] if isinstance(a, Node)]
    if node.target is CPU_ATTENTION[0]:
        return sdpa_flop_count(*shapes[:3])
    return sdpa_backward_flop_count(*shapes[:4])


def collective_time(kind: str, nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds of one ring collective of ``kind`` over ``n`` devices (``nbytes`` as in the module
    docstring); local steps (chunk, keep_one) and axes of one device cost nothing here."""
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) * latency + (n - 1) / n * nbytes / bandwidth
    if kind == "broadcast":
        return math.ceil(math.log2(n)) * latency + nbytes / bandwidth
    return 0.0


def spec_bytes(t: torch.Tensor, spec: Spec, mesh_shape: tuple[int, ...]) -> int:
    shape = local_shape(tuple(t.shape), spec, mesh_shape)
    n = 1
    for s in shape:
        n *= s
    return n * t.element_size()


# One optimizer update of a parameter as torch.optim's per-tensor implementation runs it (the one
# used on CPU): (elementwise kernels, parameter-sized tensors read plus written). Adam: lerp_ of
# the first moment (3), mul_ and addcmul_ of the second (2 + 4), sqrt, division and add_ of eps
# for the denominator (2 + 2 + 2), addcdiv_ into the parameter (4); AdamW adds the decay mul_ (2);
# SGD with momentum: mul_ and add_ of the buffer (2 + 3) and add_ into the parameter (3).
OPTIMIZER_KERNELS = {"sgd": (1, 3), "sgd-momentum": (3, 8), "adam": (7, 19), "adamw": (8, 21)}


# ---- convolutions as cuDNN runs them (DeviceSpec.convolution_algorithms == "cudnn") -------------
#
# cuDNN computes a convolution with one of several algorithms and the framework takes the fastest
# for the shape (TensorFlow autotunes by default; PyTorch with torch.backends.cudnn.benchmark, and
# its heuristics otherwise). Each algorithm is priced here as the kernels it runs, each a roofline;
# the convolution costs the cheapest one cuDNN offers for the shape (docs/cost-model.md,
# "Convolutions on GPUs"). Winograd F(m x m, r x r) (Lavin & Gray, "Fast Algorithms for
# Convolutional Neural Networks", CVPR 2016) computes an m x m output tile from an
# (m + r - 1)^2 input tile with (m + r - 1)^2 multiplications instead of m^2 r^2, as
# (m + r - 1)^2 independent matrix products over the channels.

# (name, passes it serves, filter size r, output tile m, fused): cuDNN's Winograd algorithms.
# WINOGRAD (fused; cuDNN 5): 3x3 filters, forward and backward data, tile F(2x2, 3x3) assumed.
# WINOGRAD_NONFUSED (cuDNN 5.1): 3x3 and 5x5 filters, all three passes, 6x6 transforms assumed:
# F(4x4, 3x3) and F(2x2, 5x5).
WINOGRAD_ALGORITHMS = (
    ("winograd", ("forward", "backward_data"), 3, 2, True),
    ("winograd_nonfused", ("forward", "backward_data", "backward_filter"), 3, 4, False),
    ("winograd_nonfused", ("forward", "backward_data", "backward_filter"), 5, 2, False),
)
# Lavin & Gray, section 5: F(2x2, 3x3) transforms take 32 additions per input tile and channel
# (data), 24 per output tile and channel (inverse) and 28 operations per filter; fused into the
# kernel they add to its arithmetic.
F2X2_3X3_TRANSFORM_FLOPS = (32, 24, 28)


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


class ConvPass:
    """One cuDNN call of a convolution: ``kind`` "forward", "backward_data" or "backward_filter",
    on the local shapes of one device. ``tensors``: the bytes it reads and writes (input, filter,
    output of the call); ``flops``: its direct-convolution FLOPs; ``winograd``: (tiles, channels
    into the matrix products, channels out of them, filter size) where Winograd applies, else None."""

    def __init__(self, kind: str, flops: float, nbytes: float, geometry: tuple | None, shapes: dict):
        self.kind, self.flops, self.nbytes, self.geometry, self.shapes = kind, flops, nbytes, geometry, shapes


class CostModel:
    """Prices nodes, collectives and optimizer updates on ``cluster`` over a mesh of ``mesh_shape``.
    ``tf32``: the op classes whose float32 kernels run on TF32 tensor cores; by default
    ``tf32_classes()``, torch's settings at the time the model is built (at plan time)."""

    def __init__(self, cluster: Cluster, mesh_shape: tuple[int, ...], *, tf32: frozenset[str] | None = None):
        self.cluster = cluster
        self.mesh_shape = mesh_shape
        self.links = [cluster.link(a, len(mesh_shape)) for a in range(len(mesh_shape))]
        self.tf32 = tf32_classes() if tf32 is None else frozenset(tf32)

    def peak_flops(self, dtype: torch.dtype | None, klass: str) -> float:
        """Peak FLOP/s of a kernel of class ``klass`` computing in ``dtype`` (None: no float tensor)."""
        dev = self.cluster.device
        if dtype is None:
            return dev.peak_flops
        name = dtype_name(dtype)
        return dev.peak_flops_for("tf32" if name == "float32" and klass in self.tf32 else name)

    def roofline(self, flops: float, nbytes: float, klass: str, *, peak_flops: float | None = None) -> float:
        """Seconds of one kernel of class ``klass`` doing ``flops`` and moving ``nbytes`` on a device
        whose peak for the kernel's dtype is ``peak_flops`` (default: the device's float32 peak)."""
        dev = self.cluster.device
        ceff, meff = dev.efficiencies(klass)
        peak = dev.peak_flops if peak_flops is None else peak_flops
        return max(flops / (peak * ceff), nbytes / (dev.memory_bandwidth * meff)) + dev.kernel_overhead_s

    def compute_time(self, node: Node, strategy: OpStrategy) -> float:
        meta = node.meta
        if node.op != "call_function" or meta.get("fxpar_is_view") or node.target is operator.getitem:
            # A getitem picks one output of a multi-output op out of the tuple it returned: no kernel.
            return 0.0
        split = 1
        for axis, size in enumerate(self.mesh_shape):
            if any(isinstance(spec[axis], Shard) for spec in strategy.inputs + strategy.outputs):
                split *= size
        flops = (meta["fxpar_flops"] or attention_flops(node)) / split
        # A getitem reads one output of a multi-output producer.
        ins = [output_values(u)[i] for u, i in (input_source(node, j) for j in range(len(tensor_arg_nodes(node))))]
        outs = output_values(node)
        # An output the op does not compute (None, e.g. a convolution_backward's masked grads) costs nothing.
        nbytes = sum(spec_bytes(t, s, self.mesh_shape) for t, s in zip(ins, strategy.inputs) if t is not None)
        nbytes += sum(spec_bytes(t, s, self.mesh_shape) for t, s in zip(outs, strategy.outputs) if t is not None)
        klass = op_class(node)
        measured = self.cluster.device.measured_kernel_s
        if measured and klass in MEASURED_CLASSES:
            seconds = measured.get(kernel_key(node, strategy, self.mesh_shape))
            if seconds is not None:
                return seconds
        if klass == "convolution" and self.cluster.device.convolution_algorithms == "cudnn":
            choices = self.conv_algorithms(node, strategy)
            if choices is not None:
                return sum(seconds for _, _, seconds in choices)
        own = self.roofline(flops, nbytes, klass, peak_flops=self.peak_flops(compute_dtype(ins, outs), klass))
        return own + self.batch_norm_stats_time(node, strategy)

    def batch_norm_stats_time(self, node: Node, strategy: OpStrategy) -> float:
        """Seconds of the collectives a training-mode batch norm (or its backward) runs inside itself
        when ``strategy`` cuts its batch, for statistics of the whole batch (``fxpar.rules.norm``):
        forward, one all-gather per cutting axis of every device's per-channel mean and sum of
        squared deviations (2 x channels values); backward, one all-reduce per axis of 2 x channels
        sums. Zero for any other node, an uncut batch, or a graph planned for each device's own
        statistics (``batch_norm="local"``, ``fxpar.solve.strategies.graph_batch_norm``), which runs
        none of them."""
        if graph_batch_norm(node.graph) == "local":
            return 0.0
        if node.target is aten._native_batch_norm_legit_functional.default and node.args[5]:
            x_pos, kind, stats = 0, "all_gather", output_values(node)[1]
        elif node.target is aten.native_batch_norm_backward.default:
            x_pos, kind, stats = 1, "all_reduce", tensor_arg_nodes(node)[1].meta["val"]
        else:
            return 0.0
        x = tensor_arg_nodes(node)[x_pos].meta["val"]
        spec = strategy.inputs[x_pos]
        channels = local_shape(tuple(x.shape), spec, self.mesh_shape)[1]
        nbytes = 2 * channels * (stats.element_size() if kind == "all_reduce" else output_values(node)[1].element_size())
        total, pieces = 0.0, 1
        for axis, placement in enumerate(spec):
            if isinstance(placement, Shard) and placement.dim == 0 and self.mesh_shape[axis] > 1:
                pieces *= self.mesh_shape[axis]
                total += self.collective_time(kind, nbytes * (pieces if kind == "all_gather" else 1), axis, in_step=True)
        return total

    def conv_algorithms(self, node: Node, strategy: OpStrategy) -> list[tuple[str, str, float]] | None:
        """How cuDNN runs convolution node ``node`` under ``strategy`` on one device: one
        (pass, algorithm, seconds) per library call (a forward convolution is one call; a
        ``convolution_backward`` one per gradient it computes: ``backward_data``,
        ``backward_filter``, ``backward_bias``), each the cheapest algorithm cuDNN offers for its
        shape: ``implicit_gemm`` (the direct convolution's FLOPs), ``winograd`` or
        ``winograd_nonfused``. None for a convolution this does not model (not 2-D), which is
        priced as a direct convolution."""
        passes = _conv_passes(node, strategy, self.mesh_shape)
        if passes is None:
            return None
        ins = [output_values(u)[i] for u, i in (input_source(node, j) for j in range(len(tensor_arg_nodes(node))))]
        dtype = compute_dtype(ins, output_values(node))
        peak = self.peak_flops(dtype, "convolution")
        out = []
        for p in passes:
            if p.kind == "backward_bias":
                out.append((p.kind, "reduction", self.roofline(0.0, p.nbytes, "reduction")))
                continue
            best = ("implicit_gemm", self.roofline(p.flops, p.nbytes, "convolution", peak_flops=peak))
            # Winograd kernels run on the FP32 units: float32 only, at the float32 peak (not TF32).
            if p.geometry is not None and dtype == torch.float32:
                for name, seconds in self._winograd_times(p, ins[0].element_size()):
                    if seconds < best[1]:
                        best = (name, seconds)
            out.append((p.kind, *best))
        return out

    def _winograd_times(self, p: ConvPass, elem: int) -> list[tuple[str, float]]:
        """Seconds of each Winograd algorithm cuDNN offers for pass ``p`` (elements of ``elem`` bytes)."""
        batch, out_hw, c_in, c_out, r = p.geometry  # the products contract c_in into c_out
        peak = self.cluster.device.peak_flops
        found = []
        for name, kinds, size, m, fused in WINOGRAD_ALGORITHMS:
            if size != r or p.kind not in kinds:
                continue
            a2 = (m + r - 1) ** 2
            tiles = batch * math.ceil(out_hw[0] / m) * math.ceil(out_hw[1] / m)
            gemm_flops = 2.0 * a2 * tiles * c_in * c_out
            if fused:
                # One kernel: the transforms run in registers; memory traffic as the direct kernel's.
                d, i, g = F2X2_3X3_TRANSFORM_FLOPS
                flops = gemm_flops + tiles * (d * c_in + i * c_out) + g * c_in * c_out
                found.append((name, self.roofline(flops, p.nbytes, "convolution", peak_flops=peak)))
                continue
            # Four kernels: transform the two operands into the Winograd domain (a2 values per
            # tile), a2 batched matrix products, transform the result back. The transforms are
            # memory-bound (a few operations per element moved) and priced by their bytes.
            src, other, dst = p.shapes["src"], p.shapes["other"], p.shapes["dst"]
            # Values in the Winograd domain: the source's (input or output gradient) per tile; the
            # filter's once, or, for the filter's gradient, the output gradient's per tile; the result's.
            wgrad = p.kind == "backward_filter"
            t_src = a2 * tiles * c_in
            t_other = a2 * (tiles * c_out if wgrad else c_in * c_out)
            t_dst = a2 * (c_in * c_out if wgrad else tiles * c_out)
            seconds = (
                self.roofline(0.0, (src + t_src) * elem, "elementwise")
                + self.roofline(0.0, (other + t_other) * elem, "elementwise")
                + self.roofline(gemm_flops, (t_src + t_other + t_dst) * elem, "convolution", peak_flops=peak)
                + self.roofline(0.0, (t_dst + dst) * elem, "elementwise")
            )
            found.append((name, seconds))
        return found

    def collective_time(self, kind: str, nbytes: float, axis: int, *, in_step: bool = False) -> float:
        """Seconds of collective ``kind`` on mesh axis ``axis`` (``nbytes`` as in the docstring).
        ``in_step``: a blocking collective the step waits for between computations, as calibration
        measured them: at the link's ``in_step_bandwidth_ratio`` of its bandwidth, plus its
        ``in_step_latency``."""
        link = self.links[axis]
        bandwidth, latency = link.figures(kind)
        if not in_step or self.mesh_shape[axis] <= 1:
            return collective_time(kind, nbytes, self.mesh_shape[axis], bandwidth, latency)
        return (collective_time(kind, nbytes, self.mesh_shape[axis], bandwidth * link.in_step_bandwidth_ratio, latency)
                + link.in_step_latency)

    def reshard_time(self, t: torch.Tensor, src: Spec, dst: Spec, *, in_step: bool = True) -> float:
        """Seconds of resharding ``t`` from ``src`` to ``dst``, each collective as one the step
        waits for between computations (``collective_time(..., in_step=True)``) unless ``in_step``
        is False (a collective the runtime can issue before the step needs it: priced as after a
        barrier)."""
        if src == dst:
            return 0.0
        total = 0.0
        steps = reshard_steps(src, dst)
        for step, before, after in step_bytes(tuple(t.shape), t.element_size(), src, steps, self.mesh_shape):
            copied = 0
            if step.kind not in ("chunk", "keep_one"):
                nbytes = after if step.kind == "all_gather" else before
                total += self.collective_time(step.kind, nbytes, step.axis, in_step=in_step)
                # The runtime moves a non-leading dim to the front before the collective and back
                # after it (fxpar.runtime.collectives.DistComm): two copies, each read and write.
                if step.kind in ("all_gather", "reduce_scatter") and step.dim != 0:
                    copied = 2 * (before + after)
            # Every step is a kernel of its own (a collective launch, or a local copy).
            total += self.roofline(0.0, copied, "elementwise")
        return total

    def optimizer_time(self, t: torch.Tensor, spec: Spec, optimizer: str) -> float:
        """Seconds of one optimizer update of a parameter held as ``spec``, over the device's piece
        of it: as calibrated (``DeviceSpec.optimizer_param_s`` per parameter plus
        ``optimizer_byte_s`` per byte), else the elementwise kernels of torch.optim's per-tensor
        update (``OPTIMIZER_KERNELS``), each a roofline."""
        nbytes = spec_bytes(t, spec, self.mesh_shape)
        d = self.cluster.device
        if optimizer in d.optimizer_param_s:
            return d.optimizer_param_s[optimizer] + d.optimizer_byte_s[optimizer] * nbytes
        kernels, passes = OPTIMIZER_KERNELS[optimizer]
        return kernels * self.roofline(0.0, passes * nbytes / kernels, "elementwise")

    def gradient_handoff_time(self) -> float:
        """Seconds per trainable parameter and step of the runtime's work outside the compiled graph
        (``DeviceSpec.gradient_handoff_s``): the same for every strategy, so it moves every plan's
        predicted step alike and no choice between them."""
        return self.cluster.device.gradient_handoff_s

    def bytes_per_device(self, t: torch.Tensor, spec: Spec) -> int:
        return t.numel() * t.element_size() // num_pieces(spec, self.mesh_shape)


def _conv_passes(node: Node, strategy: OpStrategy, mesh_shape: tuple[int, ...]) -> list[ConvPass] | None:
    """The cuDNN calls of a 2-D convolution node on one device (local shapes under ``strategy``),
    or None for another op or a convolution of another dimensionality."""
    aten = torch.ops.aten
    if node.target not in (aten.convolution.default, aten.convolution_backward.default):
        return None
    nodes = tensor_arg_nodes(node)
    ins = [output_values(u)[i] for u, i in (input_source(node, j) for j in range(len(nodes)))]
    local = [local_shape(tuple(t.shape), s, mesh_shape) for t, s in zip(ins, strategy.inputs)]
    if node.target == aten.convolution.default:
        x, w = local[0], local[1]
        stride, _, dilation, transposed, _, groups = node.args[3:9]
        out = local_shape(tuple(output_values(node)[0].shape), strategy.outputs[0], mesh_shape)
        grad_out = None
        mask = (False, False, False)
    else:
        grad_out, x, w = local[0], local[1], local[2]
        stride, _, dilation, transposed, _, groups, mask = node.args[4:11]
        out = grad_out
    if len(x) != 4 or len(w) != 4:
        return None
    elem = ins[0].element_size()
    n, c, h, wd = x
    k, c_g, r, s = w
    p_, q = out[2], out[3]
    flops = 2.0 * n * k * c_g * r * s * p_ * q
    x_n, w_n, y_n = _prod(x), _prod(w), _prod(out)
    winograd_ok = (not transposed and groups == 1 and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
                   and r == s)
    if grad_out is None:
        nbytes = sum(spec_bytes(t, sp, mesh_shape) for t, sp in zip(ins, strategy.inputs))
        nbytes += spec_bytes(output_values(node)[0], strategy.outputs[0], mesh_shape)
        geo = (n, (p_, q), c, k, r) if winograd_ok else None
        return [ConvPass("forward", flops, nbytes, geo, {"src": x_n, "other": w_n, "dst": y_n})]
    passes = []
    if mask[0]:
        # The gradient of the input: a convolution of the output's gradient with the flipped filter.
        geo = (n, (h, wd), k, c, r) if winograd_ok else None
        passes.append(ConvPass("backward_data", flops, (y_n + w_n + x_n) * elem, geo,
                               {"src": y_n, "other": w_n, "dst": x_n}))
    if mask[1]:
        # The gradient of the filter: tiles of the output's gradient against the input's.
        geo = (n, (p_, q), c, k, r) if winograd_ok else None
        passes.append(ConvPass("backward_filter", flops, (y_n + x_n + w_n) * elem, geo,
                               {"src": x_n, "other": y_n, "dst": w_n}))
    if mask[2]:
        passes.append(ConvPass("backward_bias", 0.0, (y_n + k) * elem, None, {}))
    return passes
