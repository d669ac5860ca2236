"""Group BatchNorm on (B, C, *spatial) shards that keeps what torch's own BatchNorm keeps for backward.

``group_batch_norm`` (norm.py) is the general form: rows (L, C), any precision, built from autograd
ops, so it saves the centred input and the normalised output besides its result. Over a whole
video network that doubles BatchNorm's activation memory, which is what sharding should divide.
Here the same statistics (group mean and biased variance, from each rank's count, mean and sum
of squared deviations in one all-gather; running statistics by norm's ``_update_running_stats``)
run inside one autograd Function that saves only the input, mean and 1/std, applies torch's
kernel, and computes the backward by the BatchNorm formula with one all-reduce of ``[Σ dy, Σ dy·x̂]``:
``dx = w/σ · (dy - Σdy/N - x̂ Σ(dy·x̂)/N)``, ``dw = Σ dy·x̂``, ``db = Σ dy`` (this rank's parts).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocal_dist.parallel.comm import all_reduce_sum
from nonlocal_dist.parallel.norm import _update_running_stats


def _channel_shape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class _GroupBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn, group):
        dims = [0, *range(2, x.dim())]
        shape = _channel_shape(x)
        mean, var, rows = _group_moments(x, dims, shape, group)
        if rows == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                "(1 value over the sequence-parallel group)"
            )
        if bn.track_running_stats:
            _update_running_stats(bn, mean, var, rows)
        invstd = torch.rsqrt(var + bn.eps)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.group, ctx.rows = group, rows
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, bn.eps)

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, weight = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = _channel_shape(x)
        x_hat = (x - mean.view(shape)).mul_(invstd.view(shape))
        local = torch.cat([dy.sum(dims), (dy * x_hat).sum(dims)])
        glob = all_reduce_sum(local, ctx.group) / ctx.rows
        channels = x.shape[1]
        scale = invstd if weight is None else invstd * weight
        dx = (dy - glob[:channels].view(shape) - x_hat.mul_(glob[channels:].view(shape))).mul_(scale.view(shape))
        affine = weight is not None
        return dx, local[channels:] if affine else None, local[:channels] if affine else None, None, None


def _group_moments(x: Tensor, dims: list[int], shape: list[int], group) -> tuple[Tensor, Tensor, int]:
    """Group mean and biased variance per channel, and the group's row count, from one all-gather.

    Each rank sends its count, mean and sum of squared deviations from its own mean (two local
    passes, no ``E[x²] - mean²`` cancellation); they combine exactly (Chan et al.):
    ``M2 = Σ_r M2_r + Σ_r n_r (mean_r - mean)²``.
    """
    rows = x.numel() // x.shape[1]
    local_mean = x.sum(dims) / max(rows, 1)
    m2 = (x - local_mean.view(shape)).square_().sum(dims)
    local = torch.cat([x.new_full((1,), float(rows)), local_mean, m2])
    table = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, local, group=group)
    stats = torch.stack(table)
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + x.shape[1]], stats[:, 1 + x.shape[1] :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / total.clamp_min(1), int(total)


def lean_group_batch_norm(x: Tensor, bn: nn.modules.batchnorm._BatchNorm, group) -> Tensor | None:
    """``bn`` on x (B, C, *spatial), statistics over ``group``; None where this path does not apply
    (half precision or mixed dtypes: use ``group_batch_norm``). Eval mode uses the running statistics."""
    dtypes = {x.dtype} | {t.dtype for t in (bn.weight, bn.running_mean) if t is not None}
    if dtypes not in ({torch.float32}, {torch.float64}) or x.dim() < 3:
        return None
    if not bn.training and bn.track_running_stats:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return _GroupBatchNorm.apply(x, bn.weight, bn.bias, bn, group)
