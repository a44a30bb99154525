"""The cost model: seconds for compute and for communication, bytes for memory, from one place.

Compute (per node, per device), for an op of class ``c`` (``op_class``: matmul, convolution,
elementwise, reduction) computing in dtype ``d`` (``compute_dtype``)::

    max(flops / (peak(d) * compute_eff(c)), bytes / (mem_bw * memory_eff(c))) + kernel_overhead

Views cost nothing. FLOPs come from the annotate pass (``torch.utils.flop_counter``); the
per-device share shrinks by every mesh axis on which the strategy shards some tensor of the op;
``bytes`` are the per-device sizes of the op's inputs and outputs, each at its own element size.
The efficiencies are the device's (``DeviceSpec.efficiencies``), per class where a profile gives
them. ``peak(d)`` is ``DeviceSpec.peak_flops_for(d)``, where ``d`` is the dtype of the op's
floating-point inputs (a bfloat16 ``mm`` under autocast computes in bfloat16), and float32 becomes
``"tf32"`` for the classes ``tf32_classes()`` names when the cost model is built.

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

import torch
from torch.fx import Node

from fxpar.cluster import Cluster, dtype_name
from fxpar.placement import Shard, Spec, local_shape, num_pieces
from fxpar.reshard import reshard_steps, step_bytes
from fxpar.rules.registry import OpStrategy, input_source, op_facts, output_values, tensor_arg_nodes

aten = torch.ops.aten

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
        if node.op != "call_function" or meta.get("fxpar_is_view"):
            return 0.0
        split = 1
        for axis, size in enumerate(self.mesh_shape):
            if any(isinstance(spec[axis], Shard) for spec in strategy.inputs + strategy.outputs):
                split *= size
        flops = meta["fxpar_flops"] / split
        # A getitem reads one output of a multi-output producer.
        ins = [output_values(u)[i] for u, i in (input_source(node, j) for j in range(len(tensor_arg_nodes(node))))]
        outs = output_values(node)
        # An output the op does not compute (None, e.g. a convolution_backward's masked grads) costs nothing.
        nbytes = sum(spec_bytes(t, s, self.mesh_shape) for t, s in zip(ins, strategy.inputs) if t is not None)
        nbytes += sum(spec_bytes(t, s, self.mesh_shape) for t, s in zip(outs, strategy.outputs) if t is not None)
        klass = op_class(node)
        return self.roofline(flops, nbytes, klass, peak_flops=self.peak_flops(compute_dtype(ins, outs), klass))

    def collective_time(self, kind: str, nbytes: float, axis: int) -> float:
        """Seconds of collective ``kind`` on mesh axis ``axis`` (``nbytes`` as in the docstring)."""
        bandwidth, latency = self.links[axis].figures(kind)
        return collective_time(kind, nbytes, self.mesh_shape[axis], bandwidth, latency)

    def reshard_time(self, t: torch.Tensor, src: Spec, dst: Spec) -> float:
        if src == dst:
            return 0.0
        total = 0.0
        steps = reshard_steps(src, dst)
        for step, before, after in step_bytes(tuple(t.shape), t.element_size(), src, steps, self.mesh_shape):
            copied = 0
            if step.kind not in ("chunk", "keep_one"):
                nbytes = after if step.kind == "all_gather" else before
                total += self.collective_time(step.kind, nbytes, step.axis)
                # The runtime moves a non-leading dim to the front before the collective and back
                # after it (fxpar.runtime.collectives.DistComm): two copies, each read and write.
                if step.kind in ("all_gather", "reduce_scatter") and step.dim != 0:
                    copied = 2 * (before + after)
            # Every step is a kernel of its own (a collective launch, or a local copy).
            total += self.roofline(0.0, copied, "elementwise")
        return total

    def optimizer_time(self, t: torch.Tensor, spec: Spec, optimizer: str) -> float:
        """Seconds of one optimizer update of a parameter held as ``spec``: the elementwise kernels
        of torch.optim's per-tensor update (``OPTIMIZER_KERNELS``) over the local shard."""
        kernels, passes = OPTIMIZER_KERNELS[optimizer]
        nbytes = spec_bytes(t, spec, self.mesh_shape)
        return kernels * self.roofline(0.0, passes * nbytes / kernels, "elementwise")

    def bytes_per_device(self, t: torch.Tensor, spec: Spec) -> int:
        return t.numel() * t.element_size() // num_pieces(spec, self.mesh_shape)
