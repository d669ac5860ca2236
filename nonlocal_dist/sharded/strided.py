"""Folded dims (``spec.Strided``) made contiguous where an op needs to know where their rows are.

``x.view(b * t, ...)`` of frames sharded along t folds them into the batch: each rank's rows are its
frames of every sample, an alias of its shard (``Strided``). The per-frame ops that follow (2-D
convs and norms, attention over each frame's tokens, element-wise math on operands folded alike, a
reduction) run on those rows as they are, and a view back to ``(b, t, ...)`` gives the t shard
again. An op that asks where the rows are (a slice, a pad or a window along the folded dim, a join,
an operand of its global length) gets ``PositionsNeeded`` from the shard; the dispatcher then
regroups each folded operand into a contiguous shard of whole blocks (whole samples) per rank, one
all-to-all logged once per call site with its bytes, and runs the op again on that. An op writing in
place into a folded operand is refused there, and so is one writing into a view of a regrouped copy
(a slice of the folded frames, ``tensor.REGROUPED``): either would write into the copy; and while
such a slice lives, a write into the folded tensor (or any alias of it) is refused, as the slice
would not see it (``tensor.SLICED_AS_COPIES``).
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from nonlocal_dist.distributed.collectives import move_shard
from nonlocal_dist.distributed.shards import even_sizes
from nonlocal_dist.sharded.rules.common import log_once, row_bytes
from nonlocal_dist.sharded.spec import PositionsNeeded, Shard, Strided
from nonlocal_dist.sharded.tensor import (
    REGROUP,
    REGROUPED,
    SLICED_AS_COPIES,
    Op,
    ShardedTensor,
    map_leaves,
    user_frame,
    written,
)


def regrouped(op: Op, x: ShardedTensor) -> ShardedTensor:
    """x with each ``Strided`` dim a contiguous ``Shard``: its ``fold`` blocks split evenly over the
    group, each rank holding its blocks whole (a differentiable all-to-all per dim). Kept (weakly) on x
    while x is unchanged, so the ops reading one folded value regroup it once."""
    key = (x._version, torch.is_grad_enabled())
    cached = getattr(x, "_regrouped", None)
    if cached is not None and cached[0] == key and (out := cached[1]()) is not None:
        return out
    local, dims = x.as_subclass(Tensor), x.spec.sharded
    for d, shard in dims.items():
        if not isinstance(shard, Strided):
            continue
        base, blocks = shard.base, even_sizes(shard.fold, shard.world)
        log_once(user_frame(), f"{op.name} needs the positions of dim {d}, folded by a view from {shard.fold} "
                               f"blocks sharded {list(base.sizes)}: regrouped to whole blocks {list(blocks)} per "
                               f"rank, about {row_bytes(local, d) * local.shape[d]} bytes per rank per call")
        local = move_shard(shard.unfold(local, d), d + 1, list(base.sizes), d, list(blocks), base.group).flatten(d, d + 1)
        dims[d] = Shard(base.group, tuple(n * base.total for n in blocks), base.rank)
    out = ShardedTensor.wrap(local, x.spec.remap(x.dim(), dims))
    x._regrouped = (key, weakref.ref(out))
    REGROUPED.add(out.untyped_storage())
    return out


def run_regrouped(op: Op, handler):
    """``handler`` (the op's rule) on ``op`` with every folded operand regrouped (``regrouped``)."""
    folded = [t for t in op._tensors() if isinstance(t, ShardedTensor) and t.spec.strided]
    target = written(op)
    if not folded:  # no operand is folded: a rule made a folded value itself and asked where its rows are
        raise op.refuse("a rule folded a dim and asked where its rows are in the same op")
    if any(t is target for t in folded):
        dims = sorted({d for t in folded for d, s in t.spec.dims if isinstance(s, Strided)})
        raise op.refuse(
            "it writes in place into a dim folded by a view (frames folded into the batch, each rank holding its "
            "frames of every sample) and needs to know where its rows are", dims[0] if len(dims) == 1 else None,
            "use the out-of-place op, or fold with .reshape (it moves the shard) instead of .view")
    swap = {id(t): regrouped(op, t) for t in folded}

    def one(a):
        return swap.get(id(a), a) if isinstance(a, Tensor) else a

    again = Op(op.func, map_leaves(one, op.args), map_leaves(one, op.kwargs))
    try:
        out = handler(again)
    except PositionsNeeded:  # no folded operand is left: a rule made one itself
        raise again.refuse("a rule folded a dim and asked where its rows are in the same op") from None
    copies = {id(s): s for s in (t.untyped_storage() for t in swap.values())}
    views = {id(s): s for s in (t.untyped_storage() for t in tree_flatten(out)[0] if isinstance(t, Tensor))
             if id(s) in copies}
    for t in folded if views else ():  # a slice of the copy given back: the folded tensor must not change now
        SLICED_AS_COPIES.setdefault(t.untyped_storage(), weakref.WeakSet()).update(views.values())
    return out


REGROUP.append(run_regrouped)
