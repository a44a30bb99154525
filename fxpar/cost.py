"""The cost model: seconds for compute and for communication, bytes for memory, from one place.

Compute (per node, per device): roofline ``max(flops / (peak * eff), bytes / (mem_bw * eff))`` plus
a per-kernel overhead; views cost nothing. FLOPs come from the annotate pass; the per-device share
shrinks by every mesh axis on which the strategy shards some tensor of the op.

Resharding runs the steps of ``fxpar.reshard``; each collective costs the alpha-beta time below
and each step, collective or local slice, one kernel overhead.

Communication (alpha-beta, ring, per mesh axis; ``docs/hardware.md``), n devices on the axis,
B bus bandwidth, alpha per-hop latency:
  all-reduce      2(n-1) alpha + 2(n-1)/n * S/B   (S: bytes per device)
  all-gather      (n-1) alpha + (n-1)/n * S/B     (S: gathered bytes per device)
  reduce-scatter  (n-1) alpha + (n-1)/n * S/B     (S: input bytes per device)
  all-to-all      (n-1) alpha + (n-1)/n * S/B
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fxpar.cluster import Cluster
from fxpar.placement import Shard, Spec, local_shape, num_pieces
from fxpar.reshard import reshard_steps, step_bytes
from fxpar.rules.registry import OpStrategy, output_values, tensor_arg_nodes


def collective_time(kind: str, nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    if n <= 1 or kind not in ("all_gather", "all_reduce", "reduce_scatter", "all_to_all"):
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth
    return (n - 1) * latency + (n - 1) / n * nbytes / bandwidth


def spec_bytes(t: torch.Tensor, spec: Spec, mesh_shape: tuple[int, ...]) -> int:
    shape = local_shape(tuple(t.shape), spec, mesh_shape)
    n = 1
    for s in shape:
        n *= s
    return n * t.element_size()


class CostModel:
    def __init__(self, cluster: Cluster, mesh_shape: tuple[int, ...]):
        self.cluster = cluster
        self.mesh_shape = mesh_shape
        self.links = [cluster.link(a, len(mesh_shape)) for a in range(len(mesh_shape))]

    def compute_time(self, node: Node, strategy: OpStrategy) -> float:
        meta = node.meta
        if node.op != "call_function" or meta.get("fxpar_is_view"):
            return 0.0
        dev = self.cluster.device
        split = 1
        for axis, size in enumerate(self.mesh_shape):
            if any(isinstance(spec[axis], Shard) for spec in strategy.inputs + strategy.outputs):
                split *= size
        flops = meta["fxpar_flops"] / split
        ins = [a.meta["val"] for a in tensor_arg_nodes(node)]
        nbytes = sum(spec_bytes(t, s, self.mesh_shape) for t, s in zip(ins, strategy.inputs))
        nbytes += sum(spec_bytes(t, s, self.mesh_shape) for t, s in zip(output_values(node), strategy.outputs))
        return max(
            flops / (dev.peak_flops * dev.compute_efficiency),
            nbytes / (dev.memory_bandwidth * dev.memory_efficiency),
        ) + dev.kernel_overhead_s

    def reshard_time(self, t: torch.Tensor, src: Spec, dst: Spec) -> float:
        if src == dst:
            return 0.0
        total = 0.0
        steps = reshard_steps(src, dst)
        for step, before, after in step_bytes(tuple(t.shape), t.element_size(), src, steps, self.mesh_shape):
            link = self.links[step.axis]
            n = self.mesh_shape[step.axis]
            nbytes = after if step.kind == "all_gather" else before
            total += collective_time(step.kind, nbytes, n, link.bandwidth, link.latency)
            # Every step is a kernel of its own (a collective launch, or a local copy).
            total += self.cluster.device.kernel_overhead_s
        return total

    def bytes_per_device(self, t: torch.Tensor, spec: Spec) -> int:
        return t.numel() * t.element_size() // num_pieces(spec, self.mesh_shape)
