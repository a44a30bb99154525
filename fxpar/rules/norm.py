"""Rules for batch norm (training mode) and layer norm, forward and backward.

Batch norm in training mode normalizes each channel with the mean and variance over the batch
and spatial dims. It can cut the channel dim (each device normalizes its channels), or the batch
dim with the statistics still those of the whole batch, as ``torch.nn.SyncBatchNorm`` computes
them, over the mesh axes that cut the batch: forward, one all-gather of every device's per-channel
mean and sum of squared deviations, combined as a parallel variance; backward, one all-reduce of
``2 * channels`` values, the sums of the gradient and of the gradient times the normalized input.
The localize hooks put those collectives into the rank's graph (``batch_norm_global_stats`` and
its backward); the results equal single-device batch norm, running statistics included. The
cost model prices those collectives as part of the op's own time
(``fxpar.cost.CostModel.batch_norm_stats_time``).

Per-device statistics, DistributedDataParallel's semantics (without SyncBatchNorm), are the
rewrite's opt-in ``batch_norm="local"`` (``fxpar.runtime.steps.BATCH_NORM_STATS``): each device
normalizes its slice with the slice's own statistics, and the layer communicates nothing. The
backward's grad_weight and grad_bias are then each device's partial sums, and the new running
statistics each device's update divided by the number of devices, so the plan's strategy is read
with Partial in their place (``local_stats_assignment``) and the rewrite's usual resharding sums
them: the weight and bias gradients join the gradient buckets, and the running statistics
(the average over devices of each device's update, the same on every rank) are one more
all-reduce per layer, outside the layer's critical path, bucketed with the others.
Layer norm normalizes over its trailing ``normalized_shape`` dims; any leading dim (batch,
sequence) can be cut, the normalized ones cannot.

Both backwards are linear in the incoming gradient (the saved statistics are constants there),
so a Partial gradient passes through to Partial results.
"""

from __future__ import annotations

import math
import warnings

import torch

from fxpar.errors import FallbackWarning
from fxpar.placement import P, R, Shard
from fxpar.rules.common import absent_as_r, fill_absent_outputs, present, sharding_axes
from fxpar.rules.registry import AxisStrategy, OpInfo, register_rule
from fxpar.runtime.steps import all_gather_over, all_reduce_over

aten = torch.ops.aten


def _channel_view(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """The dims a batch norm reduces over, and the shape that broadcasts a per-channel vector."""
    return [0, *range(2, x.dim())], [1, x.shape[1]] + [1] * (x.dim() - 2)


def batch_norm_global_stats(x, weight, bias, running_mean, running_var, momentum: float, eps: float,
                            group_names: list[str], group_sizes: list[int]):
    """Training-mode batch norm of this device's slice ``x`` of a batch cut over the groups
    ``group_names`` (of ``group_sizes`` ranks), with the statistics of the whole batch; returns what
    ``_native_batch_norm_legit_functional`` does (y, mean, rstd, new running mean and variance)."""
    dims, shape = _channel_view(x)
    in_dtype, x = x.dtype, _opmath(x, running_mean if running_mean is not None else weight)
    local_count = x.numel() // x.shape[1]
    count = local_count * math.prod(group_sizes)
    # Each device's mean and sum of squared deviations, gathered and combined as in Chan et al.'s
    # parallel variance (what SyncBatchNorm does): one collective, no E[x^2] - E[x]^2 cancellation.
    local_mean = x.mean(dims)
    local_m2 = ((x - local_mean.reshape(shape)) ** 2).sum(dims)
    pieces = all_gather_over(torch.stack([local_mean, local_m2]), group_names, group_sizes)  # [pieces, 2, C]
    mean = pieces[:, 0].mean(0)
    var = (pieces[:, 1] + local_count * (pieces[:, 0] - mean) ** 2).sum(0) / count
    centered = x - mean.reshape(shape)
    rstd = torch.rsqrt(var + eps)
    y = centered * rstd.reshape(shape)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    new_mean = running_mean * (1 - momentum) + mean * momentum
    new_var = running_var * (1 - momentum) + var * (count / (count - 1)) * momentum
    return y.to(in_dtype), mean, rstd, new_mean, new_var


def batch_norm_global_stats_backward(grad, x, weight, save_mean, save_invstd, mask: list[bool],
                                     group_names: list[str], group_sizes: list[int]):
    """The backward of ``batch_norm_global_stats`` on this device's slice: grad_x for the slice,
    grad_weight and grad_bias summed over the whole batch."""
    dims, shape = _channel_view(x)
    in_dtype = x.dtype
    x, grad = _opmath(x, save_mean), _opmath(grad, save_mean)
    count = x.numel() // x.shape[1] * math.prod(group_sizes)
    invstd = save_invstd.reshape(shape)
    xhat = (x - save_mean.reshape(shape)) * invstd
    sums = all_reduce_over(torch.cat([grad.sum(dims), (grad * xhat).sum(dims)]), group_names)
    grad_bias, grad_weight = sums[: x.shape[1]], sums[x.shape[1]:]
    grad_x = None
    if mask[0]:
        grad_x = (grad - (grad_bias / count).reshape(shape) - xhat * (grad_weight / count).reshape(shape)) * invstd
        if weight is not None:
            grad_x = grad_x * weight.reshape(shape)
        grad_x = grad_x.to(in_dtype)
    return grad_x, grad_weight if mask[1] else None, grad_bias if mask[2] else None


def _opmath(x: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """``x`` in the dtype its statistics are computed in: that of ``like`` (the running statistics
    or saved mean, float32 under autocast's bf16/fp16 activations), as torch's batch-norm kernels do;
    the result is cast back to ``x``'s dtype."""
    if like is not None and x.dtype != like.dtype and x.element_size() < like.element_size():
        return x.to(like.dtype)
    return x


def batch_norm_local_stats(x, weight, bias, running_mean, running_var, momentum: float, eps: float, num_devices: int):
    """Training-mode batch norm of this device's slice with the slice's own statistics (DDP's
    semantics); the new running statistics come divided by ``num_devices``, this device's term of
    their average over the devices."""
    y, mean, rstd, new_mean, new_var = aten._native_batch_norm_legit_functional.default(
        x, weight, bias, running_mean, running_var, True, momentum, eps)
    return y, mean, rstd, new_mean / num_devices, new_var / num_devices


def _batch_groups(spec, mesh_shape, coords) -> tuple[list[str], list[int]]:
    axes = sharding_axes(spec, 0)
    return [coords.group_names[a] for a in axes], [mesh_shape[a] for a in axes]


def _local(coords) -> bool:
    return getattr(coords, "batch_norm", "global") == "local"


def localize_batch_norm(node, args, kwargs, strategy, mesh_shape, coords):
    groups, sizes = _batch_groups(strategy.inputs[0], mesh_shape, coords)
    if not groups:
        return node.target, args, kwargs
    x, weight, bias, running_mean, running_var, _, momentum, eps = args
    if _local(coords):
        return batch_norm_local_stats, [x, weight, bias, running_mean, running_var, momentum, eps, math.prod(sizes)], {}
    return batch_norm_global_stats, [x, weight, bias, running_mean, running_var, momentum, eps, groups, sizes], {}


def localize_batch_norm_backward(node, args, kwargs, strategy, mesh_shape, coords):
    groups, sizes = _batch_groups(strategy.inputs[1], mesh_shape, coords)
    if not groups:
        return node.target, args, kwargs
    if _local(coords):
        # Local statistics: the op itself on the slice and its saved statistics; grad_weight and
        # grad_bias are this device's partial sums (see local_stats_assignment). The running
        # statistics, which a training-mode backward does not read, are dropped, so the backward
        # does not wait for their all-reduce.
        args = list(args)
        args[3] = args[4] = None
        return node.target, args, kwargs
    grad, x, weight, _, _, save_mean, save_invstd, _, _, mask = args
    return batch_norm_global_stats_backward, [grad, x, weight, save_mean, save_invstd, list(mask), groups, sizes], {}


def _partial_on(spec, axes):
    return tuple(P if a in axes else p for a, p in enumerate(spec))


def local_stats_assignment(assignment: dict) -> dict:
    """The plan's ``assignment`` (node -> OpStrategy) as the ranks run it under
    ``batch_norm="local"``: for every batch norm (or its backward) whose batch is cut, the outputs
    that the global strategy gives replicated and that per-device statistics leave as per-device
    terms (the new running statistics; grad_weight and grad_bias) are Partial on the axes that cut
    the batch, in the op's strategy and in the ``getitem`` that takes each of them out."""
    import operator

    from fxpar.rules.registry import OpStrategy

    out = dict(assignment)
    partial: dict = {}  # node -> {output index: axes}
    whole = [n.name for n, s in assignment.items() if n.target is aten._native_batch_norm_legit_functional.default
             and n.args[5] and not sharding_axes(s.inputs[0], 0)]
    if whole:
        warnings.warn(
            f"batch_norm='local': the plan runs batch norm {', '.join(whole)} on the whole batch (its batch is not "
            "cut), so it computes the whole batch's statistics there, not each device's; pin a strategy that cuts "
            "the batch (force=) for DDP's statistics", FallbackWarning, stacklevel=3)
    for node, strategy in assignment.items():
        if node.target is aten._native_batch_norm_legit_functional.default:
            axes, which = sharding_axes(strategy.inputs[0], 0), (3, 4)
        elif node.target is aten.native_batch_norm_backward.default and node.args[7]:
            axes, which = sharding_axes(strategy.inputs[1], 0), (1, 2)
        else:
            continue
        if axes:
            partial[node] = {i: axes for i in which}
            out[node] = OpStrategy(strategy.inputs, tuple(
                _partial_on(spec, axes) if i in which else spec for i, spec in enumerate(strategy.outputs)))
    for node, strategy in assignment.items():
        if node.target is operator.getitem and node.args[0] in partial and node.args[1] in partial[node.args[0]]:
            axes = partial[node.args[0]][node.args[1]]
            out[node] = OpStrategy((_partial_on(strategy.inputs[0], axes),), (_partial_on(strategy.outputs[0], axes),))
    return out


@register_rule(aten._native_batch_norm_legit_functional.default, cost_class="reduction", localize=localize_batch_norm)
def batch_norm_rule(info: OpInfo) -> list[AxisStrategy]:
    """(x, weight?, bias?, running_mean, running_var, training, momentum, eps) ->
    (y, save_mean, save_rstd, new_running_mean, new_running_var)."""
    x = info.args[0]
    vectors = info.args[1:5]
    out = [AxisStrategy(present((x, *vectors), (R,) * 5), (R,) * 5)]
    if x.dim() > 1 and x.shape[1] > 1:
        c = Shard(0)
        out.append(AxisStrategy(present((x, *vectors), (Shard(1), c, c, c, c)), (Shard(1), c, c, c, c)))
    if info.args[5] and x.shape[0] > 1:
        out.append(AxisStrategy(present((x, *vectors), (Shard(0), R, R, R, R)), (Shard(0), R, R, R, R)))
    return out


@register_rule(aten.native_batch_norm_backward.default, cost_class="reduction", localize=localize_batch_norm_backward)
def batch_norm_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad_y, x, weight?, running_mean?, running_var?, save_mean?, save_invstd?, train, eps, mask)
    -> (grad_x, grad_weight, grad_bias)."""
    absent = fill_absent_outputs(info)
    if not info.args[7]:
        # Eval-mode backward is not part of a training step; it gets only the safe strategy.
        return [AxisStrategy((R,) * len(info.tensor_args), absent_as_r(absent, (R, R, R)))]
    g, x = info.args[0], info.args[1]
    vectors = info.args[2:7]
    rows = [
        ((R, R) + (R,) * 5, (R, R, R)),
        ((P, R) + (R,) * 5, (P, P, P)),
    ]
    if x.dim() > 1 and x.shape[1] > 1:
        rows.append(((Shard(1), Shard(1)) + (Shard(0),) * 5, (Shard(1), Shard(0), Shard(0))))
    if x.shape[0] > 1:
        # The batch cut with global statistics: grad_weight and grad_bias come out all-reduced.
        rows.append(((Shard(0), Shard(0)) + (R,) * 5, (Shard(0), R, R)))
    return [AxisStrategy(present((g, x, *vectors), ins), absent_as_r(absent, outs)) for ins, outs in rows]


def _leading_dims(x: torch.Tensor, normalized_shape) -> list[int]:
    return [d for d in range(x.dim() - len(normalized_shape)) if x.shape[d] > 1]


@register_rule(aten.native_layer_norm.default, cost_class="reduction")
def layer_norm_rule(info: OpInfo) -> list[AxisStrategy]:
    """(x, normalized_shape, weight?, bias?, eps) -> (y, mean, rstd)."""
    x, shape, w, b = info.args[0], info.args[1], info.args[2], info.args[3]
    out = [AxisStrategy(present((x, w, b), (R, R, R)), (R, R, R))]
    for d in _leading_dims(x, shape):
        out.append(AxisStrategy(present((x, w, b), (Shard(d), R, R)), (Shard(d),) * 3))
    return out


@register_rule(aten.native_layer_norm_backward.default, cost_class="reduction")
def layer_norm_backward_rule(info: OpInfo) -> list[AxisStrategy]:
    """(grad_y, x, normalized_shape, mean, rstd, weight?, bias?, mask) -> (grad_x, grad_w, grad_b);
    grad_w and grad_b sum over the leading dims, so a cut there leaves Partial sums."""
    absent = fill_absent_outputs(info)
    g, x, shape, mean, rstd, w, b = info.args[:7]
    args = (g, x, mean, rstd, w, b)
    rows = [((R,) * 6, (R, R, R)), ((P, R, R, R, R, R), (P, P, P))]
    for d in _leading_dims(x, shape):
        s = Shard(d)
        rows.append(((s, s, s, s, R, R), (s, P, P)))
    return [AxisStrategy(present(args, ins), absent_as_r(absent, outs)) for ins, outs in rows]
