"""Ops that act along given dims: softmax, log_softmax, cumulative sums and products, F.normalize, roll.

Along an unsharded dim each rank's piece is computed as it is (exact, no communication; an empty
piece runs on one zero position, ``on_piece``). Along a sharded dim, ``F.normalize`` divides by the
p-norm of the whole dim (|x|^p summed over the ranks, one all-reduce per mesh dim); softmax and the
cumulative ops there are refused, as is ``roll`` along a sharded dim or with no dims (it flattens).
A missing dim (softmax's implicit one) is refused too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.sharded.rules.common import bind, on_piece, sum_over_groups
from nonlocal_dist.sharded.tensor import Op, ShardedTensor, rule


def _softmax_ref(input, dim=None, _stacklevel=3, dtype=None):
    """Signature of F.softmax / F.log_softmax."""


def _normalize_ref(input, p=2.0, dim=1, eps=1e-12, out=None):
    """Signature of F.normalize."""


def _dim_of(op: Op) -> int:
    x = op.args[0]
    a = bind(op, _softmax_ref) if op.func in (F.softmax, F.log_softmax) else op.named
    if a is None or a.get("dim") is None:
        raise op.refuse("no dim given (softmax's implicit dim)", fix="pass dim=")
    dim = a["dim"]
    if not isinstance(dim, int):
        raise op.refuse(f"dim {dim!r}: only one int dim is handled", fix="pass one int dim")
    return dim % max(x.dim(), 1)


def _along(op: Op):
    x = op.args[0]
    dim = _dim_of(op)
    if dim in x.spec.sharded:
        raise op.refuse("it acts along the sharded dim (each output reads every position of it)", dim,
                        "apply it along an unsharded dim, or where the activation is whole")
    rest = [a.as_subclass(Tensor) if isinstance(a, ShardedTensor) else a for a in op.args[1:]]
    out = on_piece(lambda t: op.run(t, *rest, **op.kwargs), x.as_subclass(Tensor), x.spec.sharded)
    return ShardedTensor.wrap(out, x.spec)


rule(F.softmax, F.log_softmax, torch.softmax, Tensor.softmax, torch.log_softmax, Tensor.log_softmax,
     torch.cumsum, Tensor.cumsum, torch.cumprod, Tensor.cumprod, torch.logcumsumexp, Tensor.logcumsumexp)(_along)


@rule(F.normalize)
def _normalize(op: Op):
    a = bind(op, _normalize_ref)
    x, p, eps = a["input"], float(a["p"]), a["eps"]
    if a["out"] is not None:
        raise op.refuse("out= on a sharded activation", fix="drop out=")
    dim = a["dim"] % max(x.dim(), 1)
    local = x.as_subclass(Tensor)
    shard = x.spec.sharded.get(dim)
    if shard is None:
        out = on_piece(lambda t: F.normalize(t, p, dim, eps), local, x.spec.sharded)
        return ShardedTensor.wrap(out, x.spec)
    if not 0 < p < float("inf"):
        raise op.refuse(f"p={p} along the sharded dim", dim, "use a finite p > 0, or normalize along another dim")
    # sum |x|^p over the ranks in float32 at least (half precision overflows past 256 squared); the
    # root only where the sum is positive, so a zero vector's gradient is torch's (finite), not NaN.
    acc = torch.promote_types(local.dtype, torch.float32)
    part = torch.linalg.vector_norm(local, p, dim, keepdim=True, dtype=acc).pow(p)
    total = sum_over_groups(part, [shard])
    positive = total > 0
    norm = torch.where(positive, total, torch.ones_like(total)).pow(1 / p) * positive
    return ShardedTensor.wrap(local / norm.clamp_min(eps).to(local.dtype).expand_as(local), x.spec)


@rule(torch.roll, Tensor.roll)
def _roll(op: Op):
    """``roll`` along unsharded dims (Swin's shifted windows over h and w): each rank's piece."""
    x = op.args[0]
    a = op.named
    dims = None if a is None else a.get("dims")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims:
        raise op.refuse("roll with no dims (it rolls the flattened tensor)", fix="give dims=")
    sharded = [d % x.dim() for d in dims if d % x.dim() in x.spec.sharded]
    if sharded:
        raise op.refuse("a roll along the sharded dim (positions wrap across ranks)", sharded[0],
                        "roll along unsharded dims, or pad and slice instead")
    out = on_piece(lambda t: op.run(t, *op.args[1:], **op.kwargs), x.as_subclass(Tensor), x.spec.sharded)
    return ShardedTensor.wrap(out, x.spec)
