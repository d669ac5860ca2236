"""Ops that act along given dims: softmax, log_softmax, cumulative sums and products, F.normalize,
``flip``, ``roll``.

Along an unsharded dim each rank's piece is computed as it is (exact, no communication; an empty
piece runs on one zero position, ``on_piece``). Along a sharded dim, ``F.normalize`` divides by the
p-norm of the whole dim (|x|^p summed over the ranks, one all-reduce per mesh dim); ``flip`` and
``roll`` permute the positions: each rank fetches those of its part (one all-to-all, logged);
``cumsum``, ``cumprod`` and ``logcumsumexp`` scan each piece and take in the earlier ranks' totals
(one all-gather of one position per rank; ``cumsum_`` and ``cumprod_`` too, written back in place);
softmax and log_softmax take the max and the sum of the exponentials over the ranks. ``roll`` with
no dims (it flattens) is refused, as is a missing dim (softmax's implicit one).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.distributed.collectives import gather_dim
from nonlocal_dist.sharded.fetch import fetch_positions
from nonlocal_dist.sharded.rules.common import (
    bind,
    log_once,
    on_piece,
    row_bytes,
    sum_over_groups,
)
from nonlocal_dist.sharded.rules.reduce import extreme_over_groups, local_extreme
from nonlocal_dist.sharded.tensor import Op, ShardedTensor, map_leaves, rule, user_frame


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
        name = getattr(op.func, "__name__", "")
        if name in _SCANS:
            return _scan(op, x, dim)
        return _softmax_over_ranks(op, x, dim, name == "log_softmax")
    rest = [a.as_subclass(Tensor) if isinstance(a, ShardedTensor) else a for a in op.args[1:]]
    out = on_piece(lambda t: op.run(t, *rest, **op.kwargs), x.as_subclass(Tensor), x.spec.sharded)
    return ShardedTensor.wrap(out, x.spec)


def _softmax_over_ranks(op: Op, x: ShardedTensor, dim: int, log: bool) -> ShardedTensor:
    """softmax (or log_softmax) along the sharded dim (attention pooling over the tokens): the max over
    the ranks (a constant shift, detached: the gradient is exact without it), then the sum of the
    exponentials over the ranks (one all-reduce, differentiable)."""
    a = bind(op, _softmax_ref) if op.func in (F.softmax, F.log_softmax) else op.named
    local = x.as_subclass(Tensor)
    if a.get("dtype") is not None:
        local = local.to(a["dtype"])
    shard = x.spec.sharded[dim]
    peak = extreme_over_groups(local_extreme(local.detach(), [dim], True), [shard], True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # all -inf: torch's nan, not ours
    shifted = local - peak
    total = sum_over_groups(shifted.exp().sum(dim, keepdim=True), [shard])
    out = shifted - total.log() if log else shifted.exp() / total
    return ShardedTensor.wrap(out, x.spec)


# Cumulative ops along a sharded dim: (the identity, the reduction of the earlier ranks' totals, how a
# rank's own scan takes them in).
_SCANS = {
    "cumsum": (0.0, lambda t, d: t.sum(d, keepdim=True), torch.add),
    "cumprod": (1.0, lambda t, d: t.prod(d, keepdim=True), torch.mul),
    "logcumsumexp": (float("-inf"), lambda t, d: t.logsumexp(d, keepdim=True), torch.logaddexp),
}


def _scan(op: Op, x: ShardedTensor, dim: int) -> ShardedTensor:
    """A cumulative sum, product or log-sum-exp along the sharded dim (a causal linear attention's or a
    recurrence's prefix): each rank scans its piece, the ranks' totals are gathered (one all-gather of
    one position each, differentiable), and each rank takes in the total of the ranks before it."""
    identity, reduce, combine = _SCANS[op.func.__name__]
    shard = x.spec.sharded[dim]
    sizes = shard.sizes  # where the positions lie (a folded dim's rows are regrouped first)
    rest = [a.as_subclass(Tensor) if isinstance(a, ShardedTensor) else a for a in op.args[1:]]
    local = op.run(x.as_subclass(Tensor), *rest, **op.kwargs)
    if shard.world == 1:
        return ShardedTensor.wrap(local, x.spec)
    # An empty piece's total is the identity, a sum of nothing plus the constant: in the autograd graph,
    # so its rank joins the gather's backward as every other does.
    last = (local.narrow(dim, sizes[shard.rank] - 1, 1) if sizes[shard.rank]
            else (local.sum(dim, keepdim=True) + identity).to(local.dtype))
    totals = gather_dim(last, dim, [1] * shard.world, shard.group)
    # The first rank takes in an empty reduction (the identity): its graph reaches the gather too, so
    # every rank joins the gather's backward.
    before = reduce(totals.narrow(dim, 0, shard.rank), dim)
    return ShardedTensor.wrap(combine(local, before), x.spec)


rule(F.softmax, F.log_softmax, torch.softmax, Tensor.softmax, torch.log_softmax, Tensor.log_softmax,
     torch.cumsum, Tensor.cumsum, torch.cumprod, Tensor.cumprod, torch.logcumsumexp, Tensor.logcumsumexp)(_along)


_IN_PLACE = {Tensor.cumsum_: Tensor.cumsum, Tensor.cumprod_: Tensor.cumprod}


def _along_in_place(op: Op):
    """``x.cumsum_(dim)``, ``x.cumprod_(dim)`` (Kandinsky 6's NABLA mask scans its sorted scores in place):
    the out-of-place rule on a copy of x (so that nothing its backward saves is overwritten), then
    written into x; along the sharded dim too."""
    x = op.args[0]
    dtype = (op.named or {}).get("dtype")
    if dtype is not None and dtype != x.dtype:  # torch's own refusal, as one process raises it
        raise RuntimeError(f"Bad in-place call: input tensor dtype {x.dtype} and output tensor dtype {dtype} "
                           "should match")
    copy = ShardedTensor.wrap(x.as_subclass(Tensor).clone(), x.spec)
    out = _along(Op(_IN_PLACE[op.func], (copy, *op.args[1:]), op.kwargs))
    x.as_subclass(Tensor).copy_(out.as_subclass(Tensor))
    return x


rule(*_IN_PLACE)(_along_in_place)


def _rows(op: Op):
    """``sort``, ``argsort``, ``topk``, ``cummax``/``cummin`` along an unsharded dim (Kandinsky
    6's block-sparse mask ranks each query's keys): each rank's rows, every output (values and
    indices) sharded as the input; along the sharded dim refused (an order across ranks)."""
    x = op.args[0]
    a = op.named
    if a is None:
        raise op.refuse("arguments that no overload of it takes", fix="call it as torch documents it")
    dim = a.get("dim", -1)
    if not isinstance(dim, int):
        raise op.refuse(f"dim {dim!r}: only one int dim is handled", fix="pass one int dim")
    dim %= max(x.dim(), 1)
    if dim in x.spec.sharded:
        raise op.refuse("it acts along the sharded dim (an order over every position of it)", dim,
                        "apply it along an unsharded dim, or where the activation is whole")
    rest = [t.as_subclass(Tensor) if isinstance(t, ShardedTensor) else t for t in op.args[1:]]
    out = on_piece(lambda t: op.run(t, *rest, **op.kwargs), x.as_subclass(Tensor), x.spec.sharded)
    return map_leaves(lambda t: ShardedTensor.wrap(t, x.spec) if isinstance(t, Tensor) else t, out)


rule(torch.sort, Tensor.sort, torch.argsort, Tensor.argsort, torch.topk, Tensor.topk, torch.cummax, Tensor.cummax,
     torch.cummin, Tensor.cummin)(_rows)


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


def _read_at(op: Op, x: ShardedTensor, moves: dict[int, Callable[[Tensor], Tensor]]) -> ShardedTensor:
    """x with each sharded dim d of ``moves`` permuted: output position i reads input position
    ``moves[d](i)`` (a flip, a roll). Each rank fetches the positions of its own part of the output
    (one all-to-all per dim, logged once per call site with its bytes); the split stays as it was."""
    local, dims = x.as_subclass(Tensor), x.spec.sharded
    for d, move in moves.items():
        shard = dims[d]
        needs = [move(torch.arange(a, a + n)) for a, n in zip(shard.starts, shard.sizes)]
        mine = needs[shard.rank]
        moved = int(((mine < shard.start) | (mine >= shard.start + shard.local)).sum())
        log_once(user_frame(), f"{op.name} along sharded dim {d}: each rank fetches the positions of its part, "
                               f"about {moved * row_bytes(local, d)} bytes to this rank per call")
        local = fetch_positions(local, d, needs, shard.sizes, shard.group, shard.rank)
        dims[d] = shard.with_sizes(shard.sizes)  # the same split; a pad's lead/trail no longer in front/behind
    return ShardedTensor.wrap(local, x.spec.remap(x.dim(), dims))


def _flip_ref(input, dims):
    """Signature of torch.flip."""


@rule(torch.flip, Tensor.flip, torch.fliplr, Tensor.fliplr, torch.flipud, Tensor.flipud)
def _flip(op: Op):
    """``flip`` (a backward scan over the frames: SANA-WM's bidirectional conv and recurrence): along a
    sharded dim each rank fetches the mirrored positions of its part; other dims flip on each piece."""
    x = op.args[0]
    name = getattr(op.func, "__name__", "flip")
    if name in ("fliplr", "flipud"):
        if x.dim() < (2 if name == "fliplr" else 1):
            return op.run(x.as_subclass(Tensor))  # torch's own error, on every rank
        dims = [1 if name == "fliplr" else 0]
    else:
        given = bind(op, _flip_ref)["dims"]
        dims = [given] if isinstance(given, int) else list(given)
    dims = sorted({d % max(x.dim(), 1) for d in dims})
    total = {d: s.total for d, s in x.spec.dims}
    out = _read_at(op, x, {d: (lambda i, n=total[d]: n - 1 - i) for d in dims if d in total})
    rest = [d for d in dims if d not in total]
    if not rest:
        return out
    return ShardedTensor.wrap(out.as_subclass(Tensor).flip(rest), out.spec)


@rule(torch.roll, Tensor.roll)
def _roll(op: Op):
    """``roll`` along unsharded dims (Swin's shifted windows over h and w): each rank's piece; along a
    sharded dim each rank fetches the positions that land in its part."""
    x = op.args[0]
    a = op.named
    dims = None if a is None else a.get("dims")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims:
        raise op.refuse("roll with no dims (it rolls the flattened tensor)", fix="give dims=")
    shifts = a["shifts"]
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    if len(shifts) != len(dims):
        return op.run(x.as_subclass(Tensor), *op.args[1:], **op.kwargs)  # torch's own error, on every rank
    total = {d: s.total for d, s in x.spec.dims}
    along = {}
    for shift, d in zip(shifts, dims):
        d %= x.dim()
        if d in total:
            along[d] = lambda i, n=total[d], s=shift, before=along.get(d): (
                (i if before is None else before(i)) - s) % n
    rest = [(s, d % x.dim()) for s, d in zip(shifts, dims) if d % x.dim() not in total]
    if along:
        x = _read_at(op, x, along)
    if not rest:
        return x
    out = on_piece(lambda t: t.roll([s for s, _ in rest], [d for _, d in rest]), x.as_subclass(Tensor),
                   x.spec.sharded)
    return ShardedTensor.wrap(out, x.spec)
