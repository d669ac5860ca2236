"""Reductions over sharded dims: each rank reduces its shard, one collective combines the ranks.

``sum``/``mean`` all-reduce partial sums (differentiable: the backward all-reduces the gradient,
the project's convention that each rank's parameter gradient is its part), ``amax``/``amin``
all-gather each rank's extreme and take it again (ties across ranks share the gradient as on one
device), ``var``/``std`` all-reduce the sum for the mean, then the squared deviations (two passes,
no cancellation). Adaptive average/max pooling to 1 along a sharded dim is the same reduction,
anywhere in a network (squeeze-excitation): the result is replicated along that dim and
broadcasts back onto the shards. The result of reducing every sharded dim is replicated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.distributed.collectives import gather_positions
from nonlocal_dist.sharded.rules.common import (
    bind,
    global_count,
    on_piece,
    per_dim,
    sum_over_groups,
)
from nonlocal_dist.sharded.spec import Shard
from nonlocal_dist.sharded.tensor import Op, ShardedTensor, rule


def reduction_args(op: Op) -> dict:
    """The op's arguments by name (torch's overload for them; ``input``, ``dim``, ``keepdim``, ...)."""
    a = op.named
    if a is None:
        raise op.refuse("arguments that no overload of it takes", fix="call it as torch documents it")
    return a


def _dims_arg(op: Op, x: Tensor) -> list[int] | None:
    """The reduced dims (sorted, non-negative), or None for all of them."""
    dim = reduction_args(op).get("dim")
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % max(x.dim(), 1) for d in dims})


def _keepdim(op: Op) -> bool:
    return bool(reduction_args(op).get("keepdim", False))


def extreme_over_groups(t: Tensor, shards: list[Shard], largest: bool) -> Tensor:
    """Differentiable max (or min) of ``t`` over the groups of ``shards``."""
    for shard in shards:
        if shard.world > 1:
            flat = t.reshape(1, -1)
            table = gather_positions(shard.group, [1] * shard.world, flat)[0]
            t = (table.amax(0) if largest else table.amin(0)).view(t.shape)
    return t


def local_extreme(local: Tensor, dims: list[int], largest: bool) -> Tensor:
    """This rank's max (or min) over ``dims``, keepdim; an empty piece gives -inf (inf) that stays in the
    autograd graph (a sum of nothing plus the constant), so its rank takes part in the backward's
    collectives like every other."""
    if local.numel() == 0:
        if not local.is_floating_point():  # integers and bools: their own extreme, in their own dtype
            shape = [1 if d in dims else n for d, n in enumerate(local.shape)]
            info = torch.iinfo(local.dtype) if local.dtype != torch.bool else None
            low, high = (False, True) if info is None else (info.min, info.max)
            return local.new_full(shape, low if largest else high)
        return local.sum(dims, keepdim=True) + (float("-inf") if largest else float("inf"))
    return local.amax(dims, keepdim=True) if largest else local.amin(dims, keepdim=True)


def _result(op: Op, x: ShardedTensor, out: Tensor, dims: list[int], keepdim: bool) -> Tensor:
    remaining = {}
    for d, shard in x.spec.dims:
        if d in dims:
            continue
        remaining[d if keepdim else d - sum(k < d for k in dims)] = shard
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), remaining))


def _reduce(op: Op, kind: str):
    x = op.args[0]
    local = x.as_subclass(Tensor)
    given = _dims_arg(op, x)
    dims = given or list(range(x.dim()))
    keepdim = _keepdim(op)
    dtype = reduction_args(op).get("dtype")
    shards = [s for d, s in x.spec.dims if d in dims]
    if kind in ("sum", "mean"):
        total = local.sum(dims, keepdim=True, dtype=dtype)
        total = sum_over_groups(total, shards)
        if kind == "mean":
            total = total / global_count(x, dims)
    else:
        largest = kind == "amax"
        total = local_extreme(local, dims, largest)
        total = extreme_over_groups(total, shards, largest)
    if not keepdim:
        total = total.squeeze(dims) if dims else total
    return _result(op, x, total, dims, keepdim)


def _touches_shard(op: Op) -> bool:
    x = op.args[0]
    dims = _dims_arg(op, x)
    return dims is None or any(d in x.spec.sharded for d in dims)


def _local_reduce(op: Op):
    x = op.args[0]
    dims = _dims_arg(op, x)
    keepdim = _keepdim(op)
    out = op.run(*[a.as_subclass(Tensor) if a is x else a for a in op.args], **op.kwargs)
    return _result(op, x, out, dims, keepdim)


def _make(kind: str):
    def run(op: Op):
        if not isinstance(op.args[0], ShardedTensor) or op.args[0].spec.replicated or not _touches_shard(op):
            return _local_reduce(op) if isinstance(op.args[0], ShardedTensor) and not op.args[0].spec.replicated \
                else _replicated(op)
        return _reduce(op, kind)

    return run


def _replicated(op: Op):
    x = op.args[0]
    out = op.run(*[a.as_subclass(Tensor) if a is x else a for a in op.args], **op.kwargs)
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), {}))


for _kind, _funcs in (("sum", (torch.sum, Tensor.sum)), ("mean", (torch.mean, Tensor.mean)),
                      ("amax", (torch.amax, Tensor.amax)), ("amin", (torch.amin, Tensor.amin))):
    rule(*_funcs)(_make(_kind))


def _var_std(op: Op):
    x = op.args[0]
    if x.spec.replicated:
        return _replicated(op)
    if not _touches_shard(op):
        return _local_reduce(op)
    local = x.as_subclass(Tensor)
    dims = _dims_arg(op, x) or list(range(x.dim()))
    a = reduction_args(op)
    keepdim = bool(a.get("keepdim", False))
    correction = a.get("correction")
    if correction is None:
        correction = 1 if a.get("unbiased", True) else 0
    shards = [s for d, s in x.spec.dims if d in dims]
    count = global_count(x, dims)
    mean = sum_over_groups(local.sum(dims, keepdim=True), shards) / count
    m2 = sum_over_groups((local - mean).square().sum(dims, keepdim=True), shards)
    out = m2 / max(count - correction, 0)
    if getattr(op.func, "__name__", "") == "std":
        out = out.sqrt()
    if not keepdim:
        out = out.squeeze(dims)
    return _result(op, x, out, dims, keepdim)


rule(torch.var, Tensor.var, torch.std, Tensor.std)(_var_std)


def _vector_norm_ref(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """Signature of torch.linalg.vector_norm."""


@rule(torch.linalg.vector_norm)
def _vector_norm(op: Op):
    """The p-norm over dims (SANA-WM's key norms): over unsharded dims on each rank's piece; over a
    sharded dim, |x|^p summed over the ranks (one all-reduce per mesh dim) for p >= 1, or the
    extreme of |x| for p = +-inf. The root is taken only where the sum is positive, so a zero
    vector's gradient is torch's (zero), not NaN."""
    a = bind(op, _vector_norm_ref)
    x, p, keepdim = a["x"], a["ord"], bool(a["keepdim"])
    if x.spec.replicated:
        return _replicated(op)
    given = a["dim"]
    dims = sorted({d % max(x.dim(), 1) for d in ([given] if isinstance(given, int) else given or range(x.dim()))})
    shards = [s for d, s in x.spec.dims if d in dims]
    if not shards:
        return _result(op, x, op.run(x.as_subclass(Tensor), p, dims, keepdim, dtype=a["dtype"]), dims, keepdim)
    p = float(p)
    if not (p >= 1 or p in (float("inf"), float("-inf"))):
        raise op.refuse(f"ord={p} over a sharded dim", dims[0] if len(dims) == 1 else None,
                        "use ord >= 1 or +-inf there, or take the norm along unsharded dims")
    local = x.as_subclass(Tensor)
    if p in (float("inf"), float("-inf")):
        largest = p > 0
        magnitude = local.abs() if a["dtype"] is None else local.abs().to(a["dtype"])
        out = extreme_over_groups(local_extreme(magnitude, dims, largest), shards, largest)
    else:
        acc = torch.promote_types(a["dtype"] or local.dtype, torch.float32)
        total = sum_over_groups(torch.linalg.vector_norm(local, p, dims, keepdim=True, dtype=acc).pow(p), shards)
        positive = total > 0
        out = (torch.where(positive, total, torch.ones_like(total)).pow(1 / p) * positive).to(a["dtype"] or local.dtype)
    if not keepdim:
        out = out.squeeze(dims)
    return _result(op, x, out, dims, keepdim)


def _adaptive(n: int, pool, largest: bool | None):
    """adaptive_{avg,max}_pool{n}d: output size 1 (or the global length, or None) along sharded spatial
    dims; a sharded batch or channel dim keeps each rank's rows."""

    def run(op: Op):
        a = bind(op, _adaptive_ref)
        x = a["input"]
        if x.spec.replicated:
            return _replicated(op)
        if a.get("return_indices"):
            raise op.refuse("return_indices=True (indices would be local to each shard)")
        sizes = per_dim(a["output_size"], n)
        first = x.dim() - n
        local = x.as_subclass(Tensor)
        reduce, keep = [], {}
        for d, shard in x.spec.dims:
            if d < first:  # a batch or channel dim (frames folded into the batch): each rank's rows as they are
                keep[d] = shard
                continue
            size = sizes[d - first]
            if size == 1:
                reduce.append(d)
            elif size is None or size == shard.total:
                keep[d] = shard
            else:
                raise op.refuse(f"output size {size} along it (global length {shard.total}); only 1 or the whole "
                                "length are exact", d, "pool to 1 along the sharded dim, or shard another dim")
        shards = [x.spec.sharded[d] for d in reduce]
        if not reduce:  # every sharded dim kept whole (torch reads an empty dim list as every dim)
            t = local
        elif largest is None:
            t = sum_over_groups(local.sum(reduce, keepdim=True), shards) / global_count(x, reduce)
        else:
            t = extreme_over_groups(local_extreme(local, reduce, True), shards, True)
        def run_pool(piece: Tensor) -> Tensor:  # kept dims at their local length (an empty piece: on_piece)
            return pool(piece, [piece.shape[first + i] if (first + i) in keep else s for i, s in enumerate(sizes)])


        out = on_piece(run_pool, t, list(keep))
        return ShardedTensor.wrap(out, x.spec.remap(out.dim(), keep))

    return run


def _adaptive_ref(input, output_size, return_indices=False):
    """Signature of F.adaptive_{avg,max}_pool{n}d."""


for _n, (_avg, _max) in enumerate(((F.adaptive_avg_pool1d, F.adaptive_max_pool1d),
                                   (F.adaptive_avg_pool2d, F.adaptive_max_pool2d),
                                   (F.adaptive_avg_pool3d, F.adaptive_max_pool3d)), 1):
    rule(_avg)(_adaptive(_n, _avg, None))
    rule(_max)(_adaptive(_n, _max, True))
rule(torch.adaptive_avg_pool1d)(_adaptive(1, F.adaptive_avg_pool1d, None))
