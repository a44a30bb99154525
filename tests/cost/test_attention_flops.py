"""The CPU flash-attention kernels, which torch.utils.flop_counter counts as 0 FLOPs, priced by
their matrix products (fxpar.cost.attention_flops) against FLOPs counted by hand."""

from __future__ import annotations

import pytest
import torch

from fxpar.cluster import Cluster, DeviceSpec, LinkSpec
from fxpar.cost import CPU_ATTENTION, CostModel, attention_flops
from fxpar.placement import R
from fxpar.planner import capture_and_annotate
from fxpar.rules.registry import OpStrategy, output_values, tensor_arg_nodes

B, H, S, D = 2, 4, 16, 8


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum()


@pytest.fixture(scope="module")
def attention_nodes():
    gm = capture_and_annotate(_Attention(), (torch.randn(B, S, H * D),))
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_function" and n.target in CPU_ATTENTION}
    assert set(nodes) == set(CPU_ATTENTION), "the CPU attention kernels did not appear in the captured graph"
    return nodes


def test_flop_counter_misses_the_cpu_kernels(attention_nodes):
    # The premise: torch's counter (what the annotate pass records) sees no FLOPs in them.
    assert all(n.meta["fxpar_flops"] == 0 for n in attention_nodes.values())


def test_attention_flops_by_hand(attention_nodes):
    product = 2 * B * H * S * S * D  # one (S x D) by (D x S) product, or (S x S) by (S x D), per head
    # Forward: Q K^T and P V.
    assert attention_flops(attention_nodes[CPU_ATTENTION[0]]) == 2 * product
    # Backward: Q K^T recomputed, dO V^T, P^T dO, dS K and dS^T Q.
    assert attention_flops(attention_nodes[CPU_ATTENTION[1]]) == 5 * product


def test_attention_priced_by_its_flops(attention_nodes):
    peak, eff, bw, meff, over = 1e9, 0.5, 1e12, 1.0, 1e-6
    device = DeviceSpec(name="d", peak_flops=peak, memory_bytes=1e10, memory_bandwidth=bw,
                        compute_efficiency=eff, memory_efficiency=meff, kernel_overhead_s=over)
    cm = CostModel(Cluster("c", device, 2, (LinkSpec(1e9, 1e-6),)), (2,))
    for target, products in zip(CPU_ATTENTION, (2, 5)):
        node = attention_nodes[target]
        ins = [a.meta["val"] for a in tensor_arg_nodes(node)]
        outs = [t for t in output_values(node) if t is not None]
        strategy = OpStrategy(tuple((R,) for _ in ins), tuple((R,) for _ in output_values(node)))
        nbytes = sum(t.numel() * t.element_size() for t in (*ins, *outs))
        flops = products * 2 * B * H * S * S * D
        # At 0.5 GFLOP/s the products dominate the bytes (at 1 TB/s).
        assert flops / (peak * eff) > nbytes / (bw * meff)
        assert cm.compute_time(node, strategy) == pytest.approx(flops / (peak * eff) + over)
    # Any other node keeps the counter's FLOPs.
    other = next(n for n in attention_nodes[CPU_ATTENTION[0]].graph.nodes if n.op == "call_function"
                 and n.target not in CPU_ATTENTION)
    assert attention_flops(other) == 0
