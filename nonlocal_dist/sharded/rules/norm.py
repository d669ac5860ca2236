"""Normalisations whose statistics span sharded dims: batch, group, instance and layer norm.

``batch_norm`` in training runs ``sharded.batchnorm.batch_norm`` (fused kernels, Chan's exact
combination, the running statistics moved as one device would, over every mesh dim the input is
sharded on). ``group_norm``, ``instance_norm`` and ``layer_norm`` over a sharded dim take the mean
and then the squared deviations from it by two differentiable all-reduces (no E[x²] - E[x]²
cancellation). Statistics that do not reach a sharded dim run locally.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.sharded.batchnorm import batch_norm
from nonlocal_dist.sharded.rules.common import (
    bind,
    global_count,
    on_piece,
    sum_over_groups,
)
from nonlocal_dist.sharded.tensor import Op, ShardedTensor, rule


def _plain(t):
    if isinstance(t, ShardedTensor):
        if not t.spec.replicated:
            raise ValueError("a sharded normalisation parameter")
        return t.as_subclass(Tensor)
    return t


def _no_channel_shard(op: Op, x: ShardedTensor) -> None:
    if 1 in x.spec.sharded and x.dim() > 1:
        raise op.refuse("the channel dim is sharded; statistics are per channel", 1, "shard a batch or spatial dim")


def _bn_ref(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Signature of F.batch_norm."""


@rule(F.batch_norm)
def _batch_norm(op: Op):
    a = bind(op, _bn_ref)
    x = a["input"]
    _no_channel_shard(op, x)
    params = [_plain(a[k]) for k in ("running_mean", "running_var", "weight", "bias")]
    groups = tuple(s.group for _, s in x.spec.dims if s.world > 1)
    out = batch_norm(x, *params, a["training"], a["momentum"] or 0.0, a["eps"], groups)
    return ShardedTensor.wrap(out, x.spec)


def normalize(x: ShardedTensor, dims: list[int], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x - mean) / sqrt(var + eps) over ``dims`` (global), keepdim; also the mean and biased var."""
    local = x.as_subclass(Tensor)
    shards = [s for d, s in x.spec.dims if d in dims and s.world > 1]
    count = global_count(x, dims)
    mean = sum_over_groups(local.sum(dims, keepdim=True), shards) / count
    centred = local - mean
    var = sum_over_groups(centred.square().sum(dims, keepdim=True), shards) / count
    return centred * torch.rsqrt(var + eps), mean, var


def _gn_ref(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Signature of F.group_norm."""


@rule(F.group_norm)
def _group_norm(op: Op):
    a = bind(op, _gn_ref)
    x = a["input"]
    _no_channel_shard(op, x)  # a group spans channels: not even the local path may run then
    if not any(d >= 2 for d, _ in x.spec.dims):
        return _local_norm(op, x)
    # A sharded batch (frames folded into it) needs nothing: the statistics are per sample.
    local = x.as_subclass(Tensor)
    b, c = local.shape[:2]
    groups = a["num_groups"]
    grouped = local.reshape(b, groups, c // groups, *local.shape[2:])
    spec = x.spec.remap(grouped.dim(), {(d + 1 if d else d): s for d, s in x.spec.dims})
    normed, _, _ = normalize(ShardedTensor.wrap(grouped, spec), list(range(2, grouped.dim())), a["eps"])
    out = normed.reshape(local.shape)
    out = _affine(out, _plain(a["weight"]), _plain(a["bias"]))
    return ShardedTensor.wrap(out, x.spec)


def _affine(t: Tensor, weight, bias) -> Tensor:
    shape = [1, -1] + [1] * (t.dim() - 2)
    if weight is not None:
        t = t * weight.view(shape)
    if bias is not None:
        t = t + bias.view(shape)
    return t


def _in_ref(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1,
            eps=1e-5):
    """Signature of F.instance_norm."""


@rule(F.instance_norm)
def _instance_norm(op: Op):
    a = bind(op, _in_ref)
    x = a["input"]
    _no_channel_shard(op, x)
    running = a["running_mean"] is not None and a["use_input_stats"]
    if not any(d >= 2 for d, _ in x.spec.dims) and not running:
        return _local_norm(op, x)  # per-instance statistics: exact on each rank's samples
    if not a["use_input_stats"]:
        out = F.batch_norm(x.as_subclass(Tensor), _plain(a["running_mean"]), _plain(a["running_var"]),
                           _plain(a["weight"]), _plain(a["bias"]), False, 0.0, a["eps"])
        return ShardedTensor.wrap(out, x.spec)
    dims = list(range(2, x.dim()))
    normed, mean, var = normalize(x, dims, a["eps"])
    running_mean, running_var = _plain(a["running_mean"]), _plain(a["running_var"])
    if running_mean is not None:
        count = global_count(x, dims)  # the unbiased variance's count over every rank (x.shape is local here)
        batch = [s for d, s in x.spec.dims if d == 0]
        samples = x.spec.global_shape(x.shape)[0]

        def over_batch(t: Tensor) -> Tensor:  # (B_r, C, 1...) -> (C,): the mean over every rank's samples
            return sum_over_groups(t.flatten(1).sum(0), batch) / samples

        with torch.no_grad():
            m = a["momentum"] if a["momentum"] is not None else 0.1
            running_mean.mul_(1 - m).add_(m * over_batch(mean.detach()).to(running_mean.dtype))
            unbiased = var.detach() * count / max(count - 1, 1)
            running_var.mul_(1 - m).add_(m * over_batch(unbiased).to(running_var.dtype))
    out = _affine(normed, _plain(a["weight"]), _plain(a["bias"]))
    return ShardedTensor.wrap(out, x.spec)


def _ln_ref(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Signature of F.layer_norm."""


def _rms_ref(input, normalized_shape, weight=None, eps=None):
    """Signature of F.rms_norm."""


def _trailing_norm(op: Op, reference, what: str):
    a = bind(op, reference)
    x = a["input"]
    shape = a["normalized_shape"]
    k = 1 if isinstance(shape, int) else len(shape)
    dims = list(range(x.dim() - k, x.dim()))
    if not any(d in x.spec.sharded for d in dims):
        return _local_norm(op, x)
    raise op.refuse(f"{what} over a sharded dim", next(d for d in dims if d in x.spec.sharded),
                    "normalise over unsharded dims (channels last), as transformers do")


@rule(F.layer_norm)
def _layer_norm(op: Op):
    return _trailing_norm(op, _ln_ref, "layer norm")


if hasattr(F, "rms_norm"):
    @rule(F.rms_norm)
    def _rms_norm(op: Op):
        return _trailing_norm(op, _rms_ref, "RMS norm")


def _local_norm(op: Op, x: ShardedTensor):
    """The norm on x's piece as it is (torch functions are off in a rule: no alias node)."""
    out = on_piece(lambda t: op.run(t, *op.args[1:], **op.kwargs), x, x.spec.sharded)
    return ShardedTensor.wrap(out, x.spec)
