"""Indexing and joining: slices of sharded dims in global coordinates, ``cat``/``stack`` along others.

A slice ``start:stop:step`` of a sharded dim keeps, on each rank, the selected global positions it
holds (SlowFast's ``x[:, :, ::4]``): exact with no communication, the result sharded by where those
positions live (uneven or empty shards as they fall). Integer or tensor indices into a sharded dim
are refused (the value lives on one rank).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.sharded.rules.common import localise, one_dim_per_group, output_dims
from nonlocal_dist.sharded.spec import Shard
from nonlocal_dist.sharded.tensor import Op, ShardedTensor, rule


def _expand_index(index, ndim: int) -> list:
    index = list(index) if isinstance(index, tuple) else [index]
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index[at : at + 1] = [slice(None)] * (ndim - used)
    return index + [slice(None)] * (ndim - used - sum(1 for i in index if i is Ellipsis))


def _slice_shard(shard: Shard, s: slice) -> tuple[slice, Shard]:
    """This rank's local slice for global slice ``s`` of a sharded dim, and the result's shard."""
    start, stop, step = s.indices(shard.total)
    if step <= 0:
        raise ValueError("step must be positive")
    sizes, local = [], slice(0, 0)
    for r, (a, n) in enumerate(zip(shard.starts, shard.sizes)):
        first = start + -(-(max(a, start) - start) // step) * step
        last = min(stop, a + n)
        count = max(0, -(-(last - first) // step)) if first < last else 0
        sizes.append(count)
        if r == shard.rank:
            local = slice(first - a, first - a + count * step, step) if count else slice(0, 0)
    return local, shard.with_sizes(sizes)


@rule(Tensor.__getitem__)
def _getitem(op: Op):
    x, index = op.args
    if x.spec.replicated:
        out = x.as_subclass(Tensor)[index]
        return ShardedTensor.wrap(out, x.spec.remap(out.dim(), {}))
    if isinstance(index, (Tensor, list)) or (isinstance(index, tuple) and any(isinstance(i, (Tensor, list)) for i in index)):
        raise op.refuse("tensor or list indices into a sharded activation", fix="index before sharding, or use slices")
    parts = _expand_index(index, x.dim())
    local_index, dims, in_dim, out_dim = [], {}, 0, 0
    for part in parts:
        if part is None:
            local_index.append(None)
            out_dim += 1
            continue
        shard = x.spec.sharded.get(in_dim)
        if isinstance(part, int) or isinstance(part, bool):
            if shard is not None:
                raise op.refuse("an integer index into a sharded dim (the position lives on one rank)", in_dim,
                                "slice it (x[:, :, i:i+1]) and reduce, or index before sharding")
            local_index.append(part)
            in_dim += 1
            continue
        if shard is not None:
            if part.step is not None and part.step <= 0:
                raise op.refuse("a non-positive step", in_dim)
            local, new = _slice_shard(shard, part)
            local_index.append(local)
            dims[out_dim] = new
        else:
            local_index.append(part)
        in_dim += 1
        out_dim += 1
    out = x.as_subclass(Tensor)[tuple(local_index)]
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), dims))


def _cat_like(op: Op, stack: bool):
    tensors = list(op.args[0])
    dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
    ndim = max(t.dim() for t in tensors) + (1 if stack else 0)
    base_ndim = ndim - 1 if stack else ndim
    dim %= ndim
    fake = one_dim_per_group(Op(op.func, tuple(tensors), {}), base_ndim)
    tensors = list(fake.args)
    dims = output_dims(fake, base_ndim)
    if not stack and dim in dims:
        raise op.refuse("concatenation along a sharded dim", dim, "concatenate along another dim (channels)")
    local = [localise(fake, t, dims, base_ndim) for t in tensors]
    out = op.func(local, dim, **{k: v for k, v in op.kwargs.items() if k != "dim"})
    if stack:
        dims = {d + (d >= dim): s for d, s in dims.items()}
    first = next(t for t in tensors if isinstance(t, ShardedTensor))
    return ShardedTensor.wrap(out, first.spec.remap(out.dim(), dims))


@rule(torch.cat, torch.concat, torch.concatenate, any_operand=True)
def _cat(op: Op):
    return _cat_like(op, stack=False)


@rule(torch.stack, any_operand=True)
def _stack(op: Op):
    return _cat_like(op, stack=True)


@rule(Tensor.split, torch.split, Tensor.chunk, torch.chunk, Tensor.unbind, torch.unbind)
def _split(op: Op):
    x = op.args[0]
    name = getattr(op.func, "__name__", "")
    position = 1 if name == "unbind" else 2
    dim = op.args[position] if len(op.args) > position else op.kwargs.get("dim", 0)
    dim %= x.dim()
    if dim in x.spec.sharded:
        raise op.refuse(f"{name} along a sharded dim", dim, f"{name} along another dim")
    args = [x.as_subclass(Tensor), *op.args[1:]]
    pieces = op.run(*args, **op.kwargs)
    dims = x.spec.sharded
    if name == "unbind":
        dims = {d - (d > dim): s for d, s in dims.items()}
    return tuple(ShardedTensor.wrap(p, x.spec.remap(p.dim(), dims)) for p in pieces)
