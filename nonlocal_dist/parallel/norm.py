"""BatchNorm whose statistics span the sequence-parallel group (works on gloo/CPU, uneven shards)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocal_dist.parallel.collectives import all_reduce


def group_batch_norm(x: Tensor, bn: nn.BatchNorm1d, group) -> Tensor:
    """``bn`` applied to x (L_r, C) as if the rows of every rank were one batch.

    Training: the group mean from one all-reduce of ``[Σx, count]``, then the biased variance from
    a second of ``Σ(x - mean)²`` (two passes: ``E[x²] - mean²`` loses float32 precision when the
    mean is large); running stats updated with the unbiased variance, as ``nn.BatchNorm1d`` does on
    the whole batch. Eval: ``bn``.
    """
    if not bn.training:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    sums = all_reduce(torch.cat([xf.sum(0), xf.new_full((1,), float(x.shape[0]))]), group)
    total = sums[-1]
    mean = sums[:-1] / total
    centred = xf - mean
    var = all_reduce((centred * centred).sum(0), group) / total
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * total / (total - 1).clamp_min(1)
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean.to(bn.running_mean.dtype))
            bn.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(bn.running_var.dtype))
    y = centred * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight.to(acc) + bn.bias.to(acc)
    return y.to(x.dtype)
