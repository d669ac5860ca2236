"""BatchNorm whose statistics span the sequence-parallel group (works on gloo/CPU, uneven and empty shards).

One autograd Function serves rows (L, C) and (B, C, *spatial) in every precision. It keeps what
torch's own BatchNorm keeps for backward (the input and the statistics), so sharding divides
BatchNorm's activation memory instead of doubling it:

- statistics from one all-gather of each rank's count, mean and sum of squared deviations from its
  own mean, combined exactly (Chan et al.): ``M2 = Σ_r M2_r + Σ_r n_r (mean_r - mean)²`` (no
  ``E[x²] - mean²`` cancellation);
- backward by the BatchNorm formula, one all-reduce of ``[Σ dy, Σ dy·x̂, Σ x̂]`` over the group:
  ``dx = w/σ · (dy - Σdy/N - (x̂ - Σx̂/N) Σ(dy·x̂)/N)``, ``dw = Σ dy·x̂``, ``db = Σ dy`` (this
  rank's parts);
- computed in ``accumulation_dtype(x.dtype)`` (float32 for half x; float32 parameters and running
  statistics beside bf16 x, as DeepSpeed's bf16 and autocast leave them), returned in x's dtype;
- a graph of the backward (``create_graph=True``) recomputes the statistics from x by
  differentiable collectives, so second-order gradients are exact too.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocal_dist.conventions import HALF_DTYPES, accumulation_dtype
from nonlocal_dist.distributed.collectives import all_reduce
from nonlocal_dist.distributed.comm import all_gather_into, all_reduce_sum
from nonlocal_dist.distributed.failure import everywhere
from nonlocal_dist.sharded.tensor import ShardedTensor


def batch_norm_rows(x: Tensor, bn: nn.BatchNorm1d, group: dist.ProcessGroup | None = None) -> Tensor:
    """``bn`` applied to rows x (L_r, C); statistics over every rank of ``group`` when one is given.

    Without a group, BatchNorm's own forward wherever torch's kernel keeps its statistics in
    float32: x, parameters and buffers in one dtype, or half x with float32 parameters and
    buffers (``torch.autocast``). Otherwise (a group, or DeepSpeed's bf16, which casts parameters
    but keeps float32 buffers) ``group_batch_norm``. Both raise for one row in training and leave
    the running statistics untouched for none.
    """
    params = {t.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None}
    own_kernel = params == {x.dtype} or (x.dtype in HALF_DTYPES and params <= {torch.float32})
    if group is not None and dist.get_world_size(group) == 1:  # one rank holds every row
        group = None
    if group is None and own_kernel and not isinstance(x, ShardedTensor):  # BatchNorm's own forward
        return nn.modules.batchnorm._BatchNorm.forward(bn, x)
    return group_batch_norm(x, bn, group)


def group_batch_norm(x: Tensor, bn: nn.modules.batchnorm._BatchNorm, group: dist.ProcessGroup | None = None) -> Tensor:
    """``bn`` applied to x (L_r, C) or (B, C, *spatial_r) as if every rank's x were one batch.

    Training (or no running statistics): the group's mean and biased variance per channel; running
    statistics updated as ``nn.BatchNorm`` does on the whole batch (unbiased variance, momentum
    None = cumulative average, ``num_batches_tracked``); a group with no rows leaves them untouched
    (the counter still counts); one value per channel over the group raises on every rank. Eval:
    the running statistics (``F.batch_norm``, so ``torch.func`` transforms run). ``group=None``:
    this process's rows alone, no collective. Same dtype as x.
    """
    if isinstance(x, ShardedTensor):  # statistics over every mesh dim the activation is sharded on
        groups = tuple(s.group for _, s in x.spec.dims if s.world > 1)
        out = _module_batch_norm(x.to_local(), bn, groups)
        return ShardedTensor.wrap(out, x.spec)
    return _module_batch_norm(x, bn, () if group is None else (group,))


def _module_batch_norm(x: Tensor, bn: nn.modules.batchnorm._BatchNorm, groups: tuple) -> Tensor:
    training = bn.training or bn.running_mean is None
    momentum = 0.0
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    running = (bn.running_mean, bn.running_var) if bn.track_running_stats or not bn.training else (None, None)
    return batch_norm(x, *running, bn.weight, bn.bias, training, momentum, bn.eps, groups)


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
               bias: Tensor | None, training: bool, momentum: float, eps: float, groups: tuple = ()) -> Tensor:
    """``F.batch_norm`` with its statistics over every rank of ``groups`` (one after another: the
    dims of a mesh); x (L_r, C) or (B, C, *spatial_r), plain or this rank's ``ShardedTensor`` (inside
    a rule: torch's own kernel then runs on it with no alias in the graph). Running statistics move by ``momentum``
    towards the group's (unbiased variance), as ``F.batch_norm`` moves them on one device."""
    acc = accumulation_dtype(x.dtype)
    if not training and running_mean is not None:
        weight, bias = (None, None) if weight is None else (weight.to(acc), bias.to(acc))
        stats = (running_mean.to(acc), running_var.to(acc))
        return F.batch_norm(x.to(acc), *stats, weight, bias, False, 0.0, eps).to(x.dtype)
    if not groups and x.dtype == acc and (weight is None or weight.dtype == acc) and (
            running_mean is None or running_mean.dtype == acc):
        return _native_training(x, running_mean, running_var, weight, bias, momentum, eps)  # no group: torch's
    if isinstance(x, ShardedTensor):  # the Function saves x for its backward: the local tensor, not the activation
        x = x.as_subclass(Tensor)
    return _GroupBatchNorm.apply(x, weight, bias, running_mean if training else None, running_var, momentum, eps,
                                 tuple(groups))


def _native_training(x: Tensor, running_mean, running_var, weight, bias, momentum: float, eps: float) -> Tensor:
    """``F.batch_norm(..., training=True, ...)``: its one check, then torch's kernel (not through
    ``F.batch_norm``'s Python again: this runs for every BatchNorm of a network on a group of one)."""
    size = x.shape
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    return torch.batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps,
                            torch.backends.cudnn.enabled)


class _GroupBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, groups):
        acc = accumulation_dtype(x.dtype)
        mean, var, rows = _moments(x, groups, fused=True)
        if rows == 1:  # torch's own message; rows is the group's count, so every rank raises
            where = "" if not groups else " (1 value over the sequence-parallel group)"
            raise everywhere(ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}{where}"
            ))
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, momentum, mean, var, rows)
        ctx.save_for_backward(x, mean, var, weight)
        ctx.groups, ctx.rows, ctx.eps = groups, rows, eps
        w, b = (None, None) if weight is None else (weight.to(acc), bias.to(acc))
        # x in its own dtype: torch's kernel reads half x with float32 statistics and parameters.
        return F.batch_norm(x, mean, var, w, b, False, 0.0, eps)

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of this backward is asked for
            return _differentiable_backward(ctx, x, dy, weight)
        acc, shape = mean.dtype, _channel_shape(x)
        invstd = torch.rsqrt(var + ctx.eps)
        w = None if weight is None else weight.to(acc)
        # Σ dy and Σ dy·x̂ in one fused pass (BatchNorm's eval-mode backward with the group's statistics).
        if x.numel():
            _, sum_dy_x_hat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, x, w, mean, var, None, None, False, ctx.eps, [False, True, True]
            )
        else:  # an empty shard (the kernel does not take one): its sums are 0, the all-reduce still runs;
            # two tensors, not one: they become the weight's and the bias's gradients (updated in place)
            sum_dy_x_hat, sum_dy = mean.new_zeros(mean.shape), mean.new_zeros(mean.shape)
        # x - mean once (not x·b + c: that cancels where the mean is large against the spread).
        centred = (x if x.dtype == acc else x.to(acc)) - mean.view(shape)
        # Σ x̂ (0 but for the mean's rounding) rides along: x̂ re-centred on it keeps Σ dx at the
        # rounding of a sum, as autograd's centring of the mean's gradient does (without it a bias
        # before BatchNorm drifted 5x further from float64 over 3 SGD steps).
        sum_x_hat = centred.sum(_reduced_dims(x)) * invstd
        local = torch.cat([sum_dy.to(acc), sum_dy_x_hat.to(acc), sum_x_hat])
        glob = _sum_over(local, ctx.groups) / max(ctx.rows, 1)
        mean_dy, mean_dy_x_hat, mean_x_hat = glob.chunk(3)
        scale = invstd if w is None else invstd * w
        # dx = scale·(dy - mean_dy + mean_x_hat·mean_dy_x_hat - x̂·mean_dy_x_hat), x̂ = (x - mean)·invstd:
        # per channel (x - mean)·b + c + dy·scale, in two fused passes.
        b = -scale * invstd * mean_dy_x_hat
        c = scale * (mean_dy_x_hat * mean_x_hat - mean_dy)
        dx = torch.addcmul(c.view(shape), centred, b.view(shape)).addcmul_(dy, scale.view(shape)).to(x.dtype)
        if weight is None:
            return dx, None, None, None, None, None, None, None
        return dx, sum_dy_x_hat.to(weight.dtype), sum_dy.to(weight.dtype), None, None, None, None, None


def _sum_over(t: Tensor, groups: tuple) -> Tensor:
    """Differentiable sum of ``t`` over each group in turn."""
    for group in groups:
        t = all_reduce(t, group)
    return t


def _differentiable_backward(ctx, x, dy, weight):
    """The backward as a function of x and dy (statistics recomputed by differentiable collectives),
    for ``create_graph=True``: second-order gradients stay exact."""
    acc = accumulation_dtype(x.dtype)
    xa, dy = x.to(acc), dy.to(acc)
    mean, var, _ = _moments(xa, ctx.groups)
    invstd = torch.rsqrt(var + ctx.eps)
    dims, shape = _reduced_dims(x), _channel_shape(x)
    x_hat = (xa - mean.view(shape)) * invstd.view(shape)
    local = torch.cat([dy.sum(dims), (dy * x_hat).sum(dims), x_hat.sum(dims)])
    glob = _sum_over(local, ctx.groups) / max(ctx.rows, 1)
    mean_dy, mean_dy_x_hat, mean_x_hat = (t.view(shape) for t in glob.chunk(3))
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = ((dy - (mean_dy - mean_dy_x_hat * mean_x_hat) - x_hat * mean_dy_x_hat) * scale.view(shape)).to(x.dtype)
    if weight is None:
        return dx, None, None, None, None, None, None, None
    sum_dy, sum_dy_x_hat, _ = local.chunk(3)
    return dx, sum_dy_x_hat.to(weight.dtype), sum_dy.to(weight.dtype), None, None, None, None, None


def _reduced_dims(x: Tensor) -> list[int]:
    """Every dim but the channels' (dim 1): rows (L, C) and (B, C, *spatial) alike."""
    return [0, *range(2, x.dim())]


def _channel_shape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _moments(x: Tensor, groups: tuple, *, fused: bool = False) -> tuple[Tensor, Tensor, int]:
    """Group mean and biased variance per channel (C,), and the group's count of values per channel.

    Each rank's count, mean and sum of squared deviations from its own mean in one all-gather,
    combined exactly (Chan et al.). ``fused``: the local moments from torch's fused two-pass
    statistics kernel (the forward; half x is read as ``accumulation_dtype``); otherwise two
    differentiable local passes (the gather's backward all-reduces), for the graph of the backward.
    """
    acc, dims, channels = accumulation_dtype(x.dtype), _reduced_dims(x), x.shape[1]
    rows = x.numel() // channels if channels else 0
    if fused and rows:
        local_mean, local_var = torch.batch_norm_update_stats(x if x.dtype == acc else x.to(acc), None, None, 0.0)
        m2 = local_var * rows
    else:
        local_mean = x.sum(dims, dtype=acc) / max(rows, 1)
        m2 = (x - local_mean.view(_channel_shape(x))).square().sum(dims, dtype=acc)
    local = torch.cat([local_mean.new_full((1,), float(rows)), local_mean, m2])
    for group in groups:  # a mesh's dims one after another: Chan's combination is associative
        local = _combine(local, channels, group)
    counts, mean, m2 = local[:1], local[1 : 1 + channels], local[1 + channels :]
    total = int(counts.sum())
    return mean, m2 / max(total, 1), total


def _combine(local: Tensor, channels: int, group: dist.ProcessGroup) -> Tensor:
    """Every rank's [count, mean (C), M2 (C)] -> the group's [count, mean, M2] (Chan et al.)."""
    stats = _GatherStats.apply(local, group)
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return torch.cat([total, mean, m2])


class _GatherStats(torch.autograd.Function):
    """(K,) on each rank -> (P, K), rank r's in row r; backward: this rank's row of the summed gradients."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        table = local.new_empty(dist.get_world_size(group), local.numel())
        all_gather_into(list(table.unbind(0)), local.contiguous(), group)
        return table

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.contiguous(), ctx.group)[dist.get_rank(ctx.group)], None


@torch.no_grad()
def _update_running_stats(running_mean: Tensor, running_var: Tensor, momentum: float, mean: Tensor, var: Tensor,
                          rows: int) -> None:
    """Move the running statistics towards this batch's (unbiased variance), as F.batch_norm."""
    if rows == 0:  # nothing to move towards (nn.BatchNorm still counts the batch)
        return
    unbiased = var * rows / max(rows - 1, 1)
    running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
    running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
