"""BatchNorm whose statistics span the sequence-parallel group (works on gloo/CPU, uneven shards)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocal_dist.parallel.collectives import all_reduce
from nonlocal_dist.conventions import HALF_DTYPES, accumulation_dtype


def batch_norm_rows(x: Tensor, bn: nn.BatchNorm1d, group=None) -> Tensor:
    """``bn`` applied to rows x (L_r, C); statistics over every rank of ``group`` when one is given.

    Without a group, BatchNorm's own forward wherever torch's kernel keeps its statistics in
    float32: x, parameters and buffers in one dtype, or half x with float32 parameters and
    buffers (``torch.autocast``). Otherwise (a group, or DeepSpeed's bf16, which casts parameters
    but keeps float32 buffers) ``group_batch_norm``. Both raise for one row in training and leave
    the running statistics untouched for none.
    """
    params = {t.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None}
    own_kernel = params == {x.dtype} or (x.dtype in HALF_DTYPES and params <= {torch.float32})
    if group is None and own_kernel:  # BatchNorm's own forward (bn may subclass it and call here)
        return nn.modules.batchnorm._BatchNorm.forward(bn, x)
    return group_batch_norm(x, bn, group)


def group_batch_norm(x: Tensor, bn: nn.BatchNorm1d, group) -> Tensor:
    """``bn`` applied to x (L_r, C) as if the rows of every rank of ``group`` were one batch.

    Training: the group mean from one all-reduce of ``[Σx, count]``, then the biased variance from
    a second of ``Σ(x - mean)²`` (two passes: ``E[x²] - mean²`` loses float32 precision when the
    mean is large); running stats updated with the unbiased variance, as ``nn.BatchNorm1d`` does on
    the whole batch. Eval: the running statistics. ``group=None``: this rank's rows alone.
    Computed in float32 (float64 for float64 input), returned in x's dtype.
    """
    acc = accumulation_dtype(x.dtype)
    weight = bn.weight.to(acc) if bn.affine else None
    bias = bn.bias.to(acc) if bn.affine else None
    if not bn.training and bn.track_running_stats:
        stats = (bn.running_mean.to(acc), bn.running_var.to(acc))
        return F.batch_norm(x.to(acc), *stats, weight, bias, False, 0.0, bn.eps).to(x.dtype)
    reduce = (lambda t: all_reduce(t, group)) if group is not None else (lambda t: t)
    xf = x.to(acc)
    sums = reduce(torch.cat([xf.sum(0), xf.new_full((1,), float(x.shape[0]))]))
    total = sums[-1]
    rows = x.shape[0] if group is None else int(total)  # the same count on every rank of the group
    if rows == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}" + ("" if group is None else " (1 row over the sequence-parallel group)")
        )
    mean = sums[:-1] / total
    centred = xf - mean
    var = reduce((centred * centred).sum(0)) / total
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean, var, rows)
    y = centred * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * weight + bias
    return y.to(x.dtype)


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm1d, mean: Tensor, var: Tensor, rows: int) -> None:
    """Move the running statistics towards this batch's (unbiased variance), as nn.BatchNorm1d."""
    bn.num_batches_tracked += 1
    if rows == 0:  # counted, as nn.BatchNorm1d counts an empty batch, but nothing to move towards
        return
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * rows / max(rows - 1, 1)
    bn.running_mean.mul_(1 - momentum).add_(momentum * mean.to(bn.running_mean.dtype))
    bn.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(bn.running_var.dtype))
