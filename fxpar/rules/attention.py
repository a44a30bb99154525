"""Rules for scaled dot-product attention as the CPU kernels record it.

``F.scaled_dot_product_attention`` on CPU tensors reaches the captured graph as
``aten._scaled_dot_product_flash_attention_for_cpu`` (q, k, v ``[B, H, L|S, E]`` -> out
``[B, H, L, Ev]``, logsumexp ``[B, H, L]``) and its backward. Attention mixes positions along the
sequence and features along E within one (batch, head) pair, so batch and heads can be cut and
the rest cannot: a cut of the query length would need the key/value rows of the whole sequence
and, under a causal mask, each shard's own offset into it. Grouped-query attention (fewer
key/value heads) cuts the heads consistently as long as each device keeps whole groups, which an
even cut of both head counts does. An optional ``attn_mask`` broadcasts against ``[B, H, L, S]``
and is cut along with the batch or heads where it has them.

The backward is linear in the incoming gradient, so a Partial gradient gives Partial gradients
of q, k and v. With ``dropout_p > 0`` each device draws its own attention dropout, like
``native_dropout``.
"""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.registry import AxisStrategy, OpInfo, register_rule

aten = torch.ops.aten


def _mask_placement(mask: torch.Tensor | None, dim: int, size: int):
    """Where a broadcasting attn_mask ``[..., L, S]`` must be for the result to be cut on ``dim``
    of ``[B, H, L, S]``: cut too if it has that dim at full size, else replicated."""
    if mask is None:
        return ()
    d = dim - (4 - mask.dim())
    return (Shard(d),) if d >= 0 and mask.shape[d] == size else (R,)


@register_rule(aten._scaled_dot_product_flash_attention_for_cpu.default, cost_class="matmul")
def sdpa_cpu_rule(info: OpInfo) -> list[AxisStrategy]:
    q, k, v = info.tensor_args[:3]
    mask = info.kwargs.get("attn_mask")
    out = [AxisStrategy((R,) * len(info.tensor_args), (R, R))]
    for dim in (0, 1):
        if q.shape[dim] > 1 and k.shape[dim] > 1:
            s = Shard(dim)
            out.append(AxisStrategy((s, s, s, *_mask_placement(mask, dim, q.shape[dim])), (s, s)))
    return out


@register_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default, cost_class="matmul")
def sdpa_cpu_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, attn_mask?) -> (gq, gk, gv)."""
    q, k = info.tensor_args[1], info.tensor_args[2]
    mask = info.kwargs.get("attn_mask")
    n = len(info.tensor_args)
    out = [AxisStrategy((R,) * n, (R, R, R))]
    out.append(AxisStrategy((P,) + (R,) * (n - 1), (P, P, P)))
    for dim in (0, 1):
        if q.shape[dim] > 1 and k.shape[dim] > 1:
            s = Shard(dim)
            out.append(AxisStrategy((s,) * 6 + _mask_placement(mask, dim, q.shape[dim]), (s, s, s)))
    return out
