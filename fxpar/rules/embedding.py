"""Rules for embedding lookup and its (dense) backward.

For ``out[..., :] = weight[indices[...], :]`` with weight ``[V, D]``, on one mesh axis:

| strategy | weight | indices | out |
|---|---|---|---|
| cut the indices (batch, sequence) | R | S(d) | S(d) |
| cut the embedding dim | S(1) | R | S(last) |
| cut the vocabulary (vocab parallel) | S(0) | R | P |
| carry a Partial table | P | R | P |

Under the vocabulary cut each device looks up only the ids in its rows and writes zeros for the
others, so the sum over devices is the full lookup; the rewrite calls ``vocab_parallel_embedding``
with the device's chunk of rows, fixed per rank when the rank's graph is made. The backward mirrors it: a device accumulates the
gradient rows of the ids it owns. With ``scale_grad_by_freq`` the gradient divides by counts over
all indices, so the backward then cuts neither the indices nor the vocabulary.
"""

from __future__ import annotations

import torch

from fxpar.placement import P, R, Shard
from fxpar.rules.common import shard_index, sharding_axes
from fxpar.rules.registry import AxisStrategy, OpInfo, local_out_shape, register_rule

aten = torch.ops.aten


def _own_rows(indices: torch.Tensor, num_rows: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This device's view of ``indices`` when it holds chunk ``index`` of the table's rows, in chunks
    of ``num_rows``: the ids shifted into the local chunk (0 where not owned) and the ownership mask."""
    offset = index * num_rows
    mask = (indices >= offset) & (indices < offset + num_rows)
    return torch.where(mask, indices - offset, torch.zeros_like(indices)), mask


def vocab_parallel_embedding(weight: torch.Tensor, indices: torch.Tensor, index: int) -> torch.Tensor:
    local, mask = _own_rows(indices, weight.shape[0], index)
    return aten.embedding.default(weight, local) * mask.unsqueeze(-1).to(weight.dtype)


def vocab_parallel_embedding_backward(grad: torch.Tensor, indices: torch.Tensor, num_rows: int, padding_idx: int,
                                      index: int) -> torch.Tensor:
    local, mask = _own_rows(indices, num_rows, index)
    offset = index * num_rows
    local_padding = padding_idx - offset if 0 <= padding_idx - offset < num_rows else -1
    grad = grad * mask.unsqueeze(-1).to(grad.dtype)
    return aten.embedding_dense_backward.default(grad, local, num_rows, local_padding, False)


def localize_embedding(node, args, kwargs, strategy, mesh_shape, coords):
    axes = sharding_axes(strategy.inputs[0], 0)
    if not axes:
        return node.target, args, kwargs
    return vocab_parallel_embedding, [args[0], args[1], shard_index(axes, mesh_shape, coords)], {}


def localize_embedding_backward(node, args, kwargs, strategy, mesh_shape, coords):
    num_rows = local_out_shape(node, strategy, mesh_shape)[0]
    axes = sharding_axes(strategy.outputs[0], 0)
    padding_idx = args[3] if args[3] >= 0 else -1
    if not axes:
        return node.target, [args[0], args[1], num_rows, *args[3:]], kwargs
    index = shard_index(axes, mesh_shape, coords)
    return vocab_parallel_embedding_backward, [args[0], args[1], num_rows, padding_idx, index], {}


@register_rule(aten.embedding.default, localize=localize_embedding)
def embedding_rule(info: OpInfo) -> list[AxisStrategy]:
    weight, indices = info.tensor_args
    if len(info.args) > 4 and info.args[4]:
        return [AxisStrategy((R, R), (R,))]  # sparse gradients: not planned beyond replication
    out = [AxisStrategy((R, R), (R,)), AxisStrategy((P, R), (P,)), AxisStrategy((Shard(0), R), (P,))]
    out += [AxisStrategy((R, Shard(d)), (Shard(d),)) for d in range(indices.dim()) if indices.shape[d] > 1]
    if weight.shape[1] > 1:
        out.append(AxisStrategy((Shard(1), R), (Shard(indices.dim()),)))
    return out


@register_rule(aten.embedding_dense_backward.default, localize=localize_embedding_backward, cost_class="reduction")
def embedding_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad_out ``[*indices.shape, D]``, indices, num_weights, padding_idx, scale_grad_by_freq)."""
    grad, indices = info.tensor_args
    last = grad.dim() - 1
    out = [AxisStrategy((R, R), (R,)), AxisStrategy((P, R), (P,))]
    if grad.shape[last] > 1:
        out.append(AxisStrategy((Shard(last), R), (Shard(1),)))
    if not info.args[4]:
        out.append(AxisStrategy((R, R), (Shard(0),)))
        out += [AxisStrategy((Shard(d), Shard(d)), (P,)) for d in range(indices.dim()) if indices.shape[d] > 1]
    return out
