"""Indexing and joining: slices of sharded dims in global coordinates, ``cat``/``stack`` along others.

A slice ``start:stop:step`` of a sharded dim keeps, on each rank, the selected global positions it
holds (SlowFast's ``x[:, :, ::4]``): exact with no communication, the result sharded by where those
positions live (uneven or empty shards as they fall). An integer index into a sharded dim (a first
frame, ``x[:, :, 0]``) is the slice ``i:i+1`` gathered whole on every rank (its owner's one
position, by one all-gather): the result is replicated along the dims that remain of that group.
Tensor indices into a sharded dim are refused; ``gather`` reads each index row's own row of the input
(the input gathered whole along the gathered dim). ``index_copy``/``index_add`` of a sharded source into
a whole buffer (rows packed by an index's values) gather the source: a replicated result.

``cat`` along a sharded dim joins global sequences (text tokens before video tokens, a class token,
frames repeated as causal padding): with one operand sharded there and the others whole on every
rank (or held by the first or last rank alone: a first frame sliced off and processed apart), the
parts before it go to the first rank and the parts after it to the last, with no communication (an
uneven, exact sharding); with several spread sharded operands or a whole one between them, the
result is split evenly and each rank fetches its positions (one all-to-all per sharded
operand, logged once per call site with its bytes). ``split``/``chunk``/``tensor_split`` along a
sharded dim are global slices.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

import nonlocal_dist.distributed.failure as failure
from nonlocal_dist.distributed.shards import split_sizes, starts
from nonlocal_dist.sharded.fetch import fetch_positions
from nonlocal_dist.sharded.rules.common import (
    bind,
    gather_unaligned,
    localise,
    log_once,
    one_dim_per_group,
    output_dims,
    row_bytes,
    whole_along,
)
from nonlocal_dist.sharded.spec import Shard
from nonlocal_dist.sharded.tensor import (
    ACTIVE_MODELS,
    Op,
    ShardedTensor,
    as_local,
    replicated_or_refuse,
    replicated_spec,
    rule,
    user_frame,
)


def _has_tensor_index(index, none_too: bool = False) -> bool:
    """Whether ``index`` holds a tensor or list (advanced indexing), or ``None`` where ``none_too``."""
    kinds = (Tensor, list)
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, kinds) or (none_too and i is None) for i in parts)


def _expand_index(index, ndim: int) -> list:
    index = list(index) if isinstance(index, tuple) else [index]
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index[at : at + 1] = [slice(None)] * (ndim - used)
        return index
    return index + [slice(None)] * (ndim - used)


def _slice_shard(shard: Shard, s: slice) -> tuple[slice, Shard]:
    """This rank's local slice for global slice ``s`` of a sharded dim, and the result's shard. The whole
    dim (``:``) keeps the shard as it is, reading no positions (a folded dim is not regrouped for it)."""
    if s.indices(shard.total) == (0, shard.total, 1):
        return slice(None), shard
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
    if _has_tensor_index(index):
        return _tensor_index(op, x, index)
    parts = _expand_index(index, x.dim())
    local_index, dims, in_dim, out_dim, picked = [], {}, 0, 0, []
    for part in parts:
        if part is None:
            local_index.append(None)
            out_dim += 1
            continue
        shard = x.spec.sharded.get(in_dim)
        if isinstance(part, bool):
            raise op.refuse("a boolean index", in_dim, "index before sharding")
        if isinstance(part, int):
            if shard is None:
                local_index.append(part)
                in_dim += 1
                continue
            if not -shard.total <= part < shard.total:
                raise failure.everywhere(IndexError(
                    f"index {part} is out of bounds for dimension {in_dim} with size {shard.total}"))
            part = slice(part % shard.total, part % shard.total + 1)
            picked.append(out_dim)
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
    out = ShardedTensor.wrap(out, x.spec.remap(out.dim(), dims))
    if not picked:
        return out
    # An integer index into a sharded dim: the position's owner slices it, every rank gets it whole.
    whole = whole_along(op, out, picked).as_subclass(Tensor)
    whole = whole[tuple(0 if d in picked else slice(None) for d in range(whole.dim()))]
    kept = [d for d in range(out.dim()) if d not in picked]
    return ShardedTensor.wrap(whole, x.spec.remap(whole.dim(), {kept.index(d): s for d, s in dims.items()
                                                                 if d not in picked}))


def _tensor_index(op: Op, x: ShardedTensor, index) -> ShardedTensor:
    """Tensor or list indices (advanced indexing, Mochi's valid text tokens ``q[i:i+1, :, kept, :]``).
    One 1-D index: the other parts first (``_getitem``), then the index along its dim, which keeps its
    place: locally along an unsharded dim; along a sharded one after gathering that dim whole (logged
    once per call site with its bytes). Several: where every sharded dim is indexed by one, those
    dims gathered whole first and the result replicated; otherwise a refusal."""
    parts = _expand_index(index, x.dim())
    tensors = [(k, p) for k, p in enumerate(parts) if isinstance(p, (Tensor, list))]
    if len(tensors) == 1:
        k, chosen = tensors[0]
        chosen = torch.as_tensor(chosen) if isinstance(chosen, list) else chosen
        if chosen.dim() == 1 and chosen.dtype != torch.bool:
            rest = tuple(slice(None) if j == k else p for j, p in enumerate(parts))
            y = _getitem(Op(Tensor.__getitem__, (x, rest), {})) if any(
                not (isinstance(p, slice) and p == slice(None)) for p in rest) else x
            at = sum(1 for p in parts[:k] if p is None or isinstance(p, slice))  # ints drop a dim, None adds one
            if at in y.spec.sharded:
                y = whole_along(op, y, [at])
            out = y.as_subclass(Tensor)[(slice(None),) * at + (chosen.to(y.device),)]
            return ShardedTensor.wrap(out, y.spec.remap(out.dim(), y.spec.sharded))
    picked, in_dim = [], 0
    for part in parts:
        if part is None:
            continue
        if isinstance(part, Tensor) and part.dtype == torch.bool or isinstance(part, bool):
            raise op.refuse("a boolean index into a sharded activation", fix="index before sharding, or use slices")
        if isinstance(part, (Tensor, list)):
            picked.append(in_dim)
        in_dim += 1
    if not set(x.spec.sharded) <= set(picked):
        raise op.refuse("tensor or list indices into a sharded activation along other dims than the sharded ones",
                        fix="index before sharding, or use slices")
    whole = whole_along(op, x, sorted(x.spec.sharded)).as_subclass(Tensor)
    out = whole[index]
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), {}))


def _main_operand(shards: list, totals: list[int]) -> int | None:
    """The operand the others join with no exchange: every operand before it whole or held by the first
    rank alone (a first frame sliced off), every one after it whole or held by the last rank alone;
    None where there is no such operand."""
    def held_by(s, q, total):
        return s is None or s.sizes[q] == total

    for k, shard in enumerate(shards):
        if shard is not None and all(held_by(s, 0, n) for s, n in zip(shards[:k], totals[:k])) and all(
                held_by(s, -1, n) for s, n in zip(shards[k + 1:], totals[k + 1:])):
            return k
    return None


def _spread_operand(shards: list) -> int | None:
    """The one operand held by several ranks where every other one is whole or held by one rank, and
    those to move to the first or last rank are small (at most one rank's share of it: a class
    token; larger ones are joined by an even reshard, which keeps the ranks balanced)."""
    spread = [k for k, s in enumerate(shards) if s is not None and not s.held_by_one()]
    if len(spread) != 1:
        return None
    k = spread[0]
    world = shards[k].world
    moving = sum(s.total for j, s in enumerate(shards) if s is not None and j != k
                 and s.sizes[0 if j < k else world - 1] != s.total)
    return k if moving * world <= shards[k].total else None


def _move_held_parts(op: Op, local: list, shards: list, k: int, dim: int, group, rank: int, world: int):
    """Every part held by one rank moved to the first rank if it comes before operand k, to the last
    if after (one all-to-all each, logged once per call site with its bytes): then ``cat`` joins
    them to operand k with no other exchange."""
    local, shards = list(local), list(shards)
    for j, shard in enumerate(shards):
        if j == k or shard is None:
            continue
        to = 0 if j < k else world - 1
        if shard.sizes[to] == shard.total:
            continue
        needs = [torch.arange(shard.total) if q == to else torch.arange(0) for q in range(world)]
        log_once(user_frame(), f"{op.name} along sharded dim {dim}: a part of {shard.total} positions held by one "
                               f"rank moved to rank {to}, about {shard.total * row_bytes(local[j], dim)} bytes per call")
        local[j] = fetch_positions(local[j], dim, needs, shard.sizes, group, rank)
        shards[j] = shard.with_sizes([shard.total if q == to else 0 for q in range(world)])
    return local, shards


def _cat_like(op: Op, stack: bool):
    tensors = list(op.args[0])
    if not stack:  # torch's cat skips 1-D empty operands (its legacy form), whatever the other shapes
        tensors = [t for t in tensors if isinstance(t, ShardedTensor) or not (t.dim() == 1 and t.shape[0] == 0)]
    dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
    ndim = max(t.dim() for t in tensors) + (1 if stack else 0)
    base_ndim = ndim - 1 if stack else ndim
    dim %= ndim
    fake = one_dim_per_group(Op(op.func, tuple(tensors), {}), base_ndim)
    tensors = list(fake.args)
    if not stack and any(isinstance(t, ShardedTensor) and dim - base_ndim + t.dim() in t.spec.sharded for t in tensors):
        return _cat_along_shard(op, tensors, dim, base_ndim)
    dims = output_dims(fake, base_ndim)
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


@rule(Tensor.split, torch.split, Tensor.split_with_sizes, torch.split_with_sizes, Tensor.chunk, torch.chunk,
      Tensor.unbind, torch.unbind)
def _split(op: Op):
    x = op.args[0]
    name = getattr(op.func, "__name__", "")
    position = 1 if name == "unbind" else 2
    dim = op.args[position] if len(op.args) > position else op.kwargs.get("dim", 0)
    dim %= x.dim()
    if dim in x.spec.sharded:
        if name == "unbind":
            raise op.refuse("unbind along a sharded dim (each position lives on one rank)", dim,
                            "slice it (x[:, i:i+1]) or unbind along another dim")
        return _split_along_shard(op, x, dim, name)
    args = [x.as_subclass(Tensor), *op.args[1:]]
    pieces = op.run(*args, **op.kwargs)
    dims = x.spec.sharded
    if name == "unbind":
        dims = {d - (d > dim): s for d, s in dims.items()}
    return tuple(ShardedTensor.wrap(p, x.spec.remap(p.dim(), dims)) for p in pieces)


def _cat_along_shard(op: Op, tensors: list, dim: int, ndim: int) -> ShardedTensor:
    """``cat`` along ``dim``, sharded by one group in some operands, whole (plain, or replicated there)
    in the others. Any other sharded dim must be split alike in every operand that shards it."""
    def shard_of(t):
        return t.spec.sharded.get(dim - ndim + t.dim()) if isinstance(t, ShardedTensor) else None

    shards = [shard_of(t) for t in tensors]
    along = [s for s in shards if s is not None]
    if any(s.group is not along[0].group for s in along):
        raise op.refuse("its operands are sharded along the joined dim over different groups", dim,
                        "shard them over the same mesh dim")
    first = next(t for t, s in zip(tensors, shards) if s is not None)
    rest = {d: s for d, s in first.spec.sharded.items() if d != dim}
    for t in tensors:
        if isinstance(t, ShardedTensor):
            other = {d - t.dim() + ndim: s for d, s in t.spec.sharded.items() if d - t.dim() + ndim != dim}
            if other.keys() - rest.keys() or any(not s.same(rest[d]) for d, s in other.items()):
                raise op.refuse("its operands are sharded differently along the other dims", dim,
                                "compute them from the same sharded input")
    local = [localise(op, t, rest, ndim) for t in tensors]
    totals = [s.total if s is not None else t.shape[dim] for t, s in zip(local, shards)]
    group, rank, world = along[0].group, along[0].rank, along[0].world
    kwargs = {k: v for k, v in op.kwargs.items() if k != "dim"}
    k = _main_operand(shards, totals)
    if k is None:  # parts one rank holds on the wrong side of the spread one (MiniMax's class token after it)
        k = _spread_operand(shards)
        if k is not None:
            local, shards = _move_held_parts(op, local, shards, k, dim, group, rank, world)
    if k is not None:  # the parts before it on the first rank, after it on the last: no exchange
        sizes = list(shards[k].sizes)
        sizes[0] += sum(totals[:k])
        sizes[-1] += sum(totals[k + 1:])
        # A rank that holds none of a whole part joins an empty slice of it: every rank's graph reaches
        # every operand (a parameter gets a zero gradient there, not None).
        before = local[:k] if rank == 0 else [t.narrow(dim, 0, 0) for t in local[:k]]
        after = local[k + 1:] if rank == world - 1 else [t.narrow(dim, 0, 0) for t in local[k + 1:]]
        pieces = [*before, local[k], *after]
        out = op.func(pieces, dim, **kwargs)
    else:  # an even split of the joined length; each rank fetches its positions of every sharded operand
        sizes = list(split_sizes(sum(totals), world))
        targets = [(a, a + n) for a, n in zip(starts(sizes), sizes)]
        pieces, offset, moved = [], 0, 0
        for t, shard, total in zip(local, shards, totals):
            def part(q):
                lo, hi = max(targets[q][0], offset), min(targets[q][1], offset + total)
                return torch.arange(lo - offset, max(lo, hi) - offset)
            if shard is None:
                mine = part(rank)
                pieces.append(t.narrow(dim, int(mine[0]) if len(mine) else 0, len(mine)))
            else:
                needs = [part(q) for q in range(world)]
                pieces.append(fetch_positions(t, dim, needs, shard.sizes, group, rank))
                moved += sum(map(len, needs)) * row_bytes(t, dim)
            offset += total
        log_once(user_frame(), f"{op.name} along sharded dim {dim}: resharded to an even split {sizes}, "
                                f"about {moved} bytes moved over the group per call")
        out = op.func(pieces, dim, **kwargs)
    lead = shards[k].lead + sum(totals[:k]) if k is not None else 0  # a prefix (a causal pad) in front
    spec = first.spec.remap(ndim, {**rest, dim: Shard(group, tuple(sizes), rank, lead)})
    return ShardedTensor.wrap(out, spec)


def _split_along_shard(op: Op, x: ShardedTensor, dim: int, name: str) -> tuple:
    """``split``/``chunk`` along a sharded dim: each piece a global slice (``_getitem``), uneven or
    empty shards as the positions fall."""
    total = x.spec.sharded[dim].total
    how = op.args[1] if len(op.args) > 1 else next(
        op.kwargs[k] for k in ("split_size_or_sections", "split_size", "split_sizes", "chunks", "sections")
        if k in op.kwargs)
    if isinstance(how, int):  # chunk(n): pieces of ceil(total / n), as torch.chunk
        size = -(-total // how) if name == "chunk" else how
        lengths = [min(size, total - a) for a in range(0, total, size)] if total else [0]
    else:
        lengths = list(how)
        if sum(lengths) != total:
            raise op.refuse(f"split sizes {lengths} that do not sum to the dim's length {total}", dim)
    return _global_slices(x, dim, [(a, a + n) for a, n in zip(starts(lengths), lengths)])


def _global_slices(x: ShardedTensor, dim: int, bounds: list[tuple[int, int]]) -> tuple:
    """The global slices ``[lo, hi)`` of sharded dim ``dim`` (``_getitem``: no communication)."""
    return tuple(_getitem(Op(Tensor.__getitem__, (x, (slice(None),) * dim + (slice(lo, hi),)), {}))
                 for lo, hi in bounds)


def _narrow_ref(input, dim, start, length):
    """Signature of torch.narrow."""


@rule(Tensor.narrow, torch.narrow)
def _narrow(op: Op):
    """``narrow`` (SANA-WM's shift of a flipped sequence): the global slice ``[start, start + length)``
    of ``dim``, as ``x[..., start:start + length]`` (torch's bounds checked, on every rank)."""
    a = bind(op, _narrow_ref)
    x, start, length = a["input"], a["start"], a["length"]
    if isinstance(start, Tensor):  # torch takes a 0-dim tensor for start
        start = int(start)
    shape = x.spec.global_shape(x.shape)  # x.shape is the local one inside a rule
    dim = a["dim"]
    if not -len(shape) <= dim < len(shape):
        raise failure.everywhere(IndexError(
            f"Dimension out of range (expected to be in range of [{-len(shape)}, {len(shape) - 1}], but got {dim})"))
    dim %= len(shape)
    size = shape[dim]
    first = start + size if start < 0 else start
    if not 0 <= first <= size or length < 0 or first + length > size:
        raise failure.everywhere(RuntimeError(
            f"narrow(): start ({start}) + length ({length}) exceeds dimension size ({size}), or start is out of "
            f"range [{-size}, {size}] or length is negative"))
    start = first
    index = (slice(None),) * dim + (slice(start, start + length),)
    return _getitem(Op(Tensor.__getitem__, (x, index), {}))


@rule(Tensor.tensor_split, torch.tensor_split)
def _tensor_split(op: Op):
    """``tensor_split`` (MViT's class token off the tokens): along a sharded dim, global slices."""
    x = op.args[0]
    a = op.named
    if a is None:
        raise op.refuse("arguments that no overload of it takes", fix="call it as torch documents it")
    dim = a.get("dim", 0) % x.dim()
    if dim not in x.spec.sharded:
        pieces = op.run(x.as_subclass(Tensor), *op.args[1:], **op.kwargs)
        return tuple(ShardedTensor.wrap(p, x.spec.remap(p.dim(), x.spec.sharded)) for p in pieces)
    how = next(a[k] for k in ("indices", "sections", "tensor_indices_or_sections", "indices_or_sections") if k in a)
    if isinstance(how, Tensor):
        how = int(how) if how.dim() == 0 else how.tolist()
    total = x.spec.sharded[dim].total
    if isinstance(how, int):  # n sections: the first total % n one longer
        if how <= 0:
            raise failure.everywhere(RuntimeError(f"number of sections must be larger than 0, got {how}"))
        lengths = [total // how + (i < total % how) for i in range(how)]
        bounds = [(lo, lo + n) for lo, n in zip(starts(lengths), lengths)]
    else:
        edges = [0, *(min(max(i if i >= 0 else i + total, 0), total) for i in how), total]
        bounds = [(lo, max(lo, hi)) for lo, hi in zip(edges, edges[1:])]
    return _global_slices(x, dim, bounds)


def _storage_count(t: Tensor) -> int | None:
    """How many holders t's storage has, as torch counts them (None where this build does not tell)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


@functools.cache
def _lone_count() -> int | None:
    """The count of a tensor that nothing else holds, measured on this build (not assumed)."""
    return _storage_count(torch.empty(1))


def _shares_storage(x: Tensor) -> bool:
    """Whether another tensor (a view taken before, an alias such as ``.data``) holds x's storage: it
    would keep reading the old storage after x became its shard. Where torch does not tell, assumed."""
    count, lone = _storage_count(x), _lone_count()
    return count is None or lone is None or count > lone


def _promoted(op: Op, x: Tensor, index, value) -> ShardedTensor | None:
    """A plain buffer of the global shape written with sharded values (``out = torch.empty(...)``, then
    ``out[:, :, :k] = conv(...)``: the cached causal convolutions of KVAE and Kandinsky 6's VAE) made,
    in place, this rank's part of a sharded buffer: sharded alike along the dims the value is sharded
    on, split as the value where it covers the whole dim, else evenly (later writes reshard to it).
    What the buffer held is kept on each rank's part. None (the caller writes the values whole) for
    tensor indices, a view, a tensor whose storage another holds (a view taken before, ``.data``),
    one that needs gradients, a parameter or buffer of a parallelized model (its state stays whole),
    and a write other than through step-1 slices of the values' length. A sharded index is refused."""
    parts = index if isinstance(index, tuple) else (index,)
    if not isinstance(value, ShardedTensor) or any(isinstance(i, ShardedTensor) and i.spec.dims for i in parts):
        raise op.refuse("a sharded index into a plain tensor", fix="index with slices or plain tensors")
    if _has_tensor_index(index, none_too=True):
        return None
    state = any(x is t for model in ACTIVE_MODELS for t in (*model.parameters(), *model.buffers()))
    if x.requires_grad or x.grad_fn is not None or x._base is not None or state or _shares_storage(x):
        return None
    parts = _expand_index(index, x.dim())
    kept = [d for d, part in enumerate(parts) if not isinstance(part, int)]
    lead = len(kept) - value.dim()
    dims, local = {}, [slice(None)] * x.dim()
    for dv, shard in value.spec.dims:
        d = kept[dv + lead] if dv + lead >= 0 else None
        part = parts[d] if d is not None else None
        if not isinstance(part, slice) or part.step not in (None, 1) or len(range(*part.indices(x.shape[d]))) != shard.total:
            return None
        whole = part.indices(x.shape[d])[:2] == (0, x.shape[d])
        dims[d] = shard.with_sizes(shard.sizes if whole else split_sizes(x.shape[d], shard.world))
        local[d] = slice(dims[d].start, dims[d].start + dims[d].local)
    log_once(user_frame(), f"{op.name} writes sharded values into a plain tensor of shape {tuple(x.shape)}: it becomes "
                           f"this rank's part of a tensor sharded along {sorted(dims)}")
    with torch.no_grad():
        x.set_(x[tuple(local)].clone())
    return ShardedTensor.wrap(x, value.spec.remap(x.dim(), dims))


@rule(Tensor.__setitem__, any_operand=True)
def _setitem(op: Op):
    """``x[index] = value`` with slices of the sharded dims (``out[..., 0::2] = ...`` of a rotary
    embedding, MViT's ``attn[:, :, 1:, 1:] += rel_pos``): each rank writes its positions of the global
    slice; ``value`` sharded alike there, or plain of the slice's global length (sliced) or of length 1
    (broadcast)."""
    x, index, value = op.args
    if not isinstance(x, ShardedTensor):
        if isinstance(value, ShardedTensor) and value.spec.replicated:  # the same values on every rank
            return op.run(x, index, value.as_subclass(Tensor))
        promoted = _promoted(op, x, index, value)
        if promoted is None:
            # Rows packed by tensor indices (Cosmos 3's joint sequence), a view of a plain buffer (WanAnimate
            # 2's packed queries), a model's state: the values gathered whole (logged), the same write on
            # every rank; the buffer stays plain, replicated from there on.
            whole = whole_along(op, value, [d for d, _ in value.spec.dims])
            return op.run(x, index, whole.as_subclass(Tensor))
        x = promoted
    if _has_tensor_index(index, none_too=True):
        raise op.refuse("a tensor, list or None index in an assignment to a sharded activation",
                        fix="assign through slices of the unsharded dims")
    parts = _expand_index(index, x.dim())
    view_dims, position = {}, 0
    for d, part in enumerate(parts):
        shard = x.spec.sharded.get(d)
        if shard is not None:
            if not isinstance(part, slice) or (part.step is not None and part.step <= 0):
                raise op.refuse("an integer index or a non-positive step into a sharded dim in an assignment", d,
                                "assign through a slice of it")
            # a global slice (MViT's attn[:, :, 1:, 1:] += ...): each rank writes its positions of it
            parts[d], view_dims[position] = _slice_shard(shard, part)
        if not isinstance(part, int):
            position += 1
    view_ndim = position
    value = gather_unaligned(op, value, view_dims, view_ndim)  # the value's shards the target's do not line up with
    local_value = localise(op, value, view_dims, view_ndim) if isinstance(value, Tensor) else value
    x[tuple(parts)] = local_value  # on x itself: torch functions are off in a rule


def _sharded_only(op: Op, main, **whole) -> bool:
    """Whether ``main`` is sharded; the tensors of ``whole`` (by name) must not be: refused if one is."""
    for name, t in whole.items():
        if isinstance(t, ShardedTensor) and t.spec.sharded:
            raise op.refuse(f"a sharded {name}", None, f"keep the {name} whole on every rank, or gather it (full_tensor)")
    return isinstance(main, ShardedTensor) and bool(main.spec.sharded)


def _index_scatter_ref(input, dim, index, source, *, alpha=1):
    """Signature of index_copy and index_add (only index_add takes ``alpha``)."""


@rule(Tensor.index_copy, torch.index_copy, Tensor.index_copy_, Tensor.index_add, torch.index_add, Tensor.index_add_,
      any_operand=True)
def _index_scatter(op: Op):
    """``buffer.index_copy(dim, index, source)`` (and ``index_add``) of a sharded source into a whole
    buffer (MiniMax-H3 packs its text, audio and video rows into one sequence so): where the source's
    rows land is read from the index's values, so the source is gathered whole (logged with its
    bytes; its backward sums the ranks' gradients) and every rank packs alike: the result is
    replicated. A sharded buffer or index is refused."""
    a = bind(op, _index_scatter_ref)
    buffer, index, source = a["input"], a["index"], a["source"]
    if not _sharded_only(op, source, buffer=buffer, index=index):
        return replicated_or_refuse(op)
    whole = as_local(whole_along(op, source, [d for d, _ in source.spec.dims]))
    args = [as_local(t) for t in op.args]
    kwargs = {k: as_local(v) for k, v in op.kwargs.items()}
    if len(args) > 3:
        args[3] = whole
    else:
        kwargs["source"] = whole
    out = op.run(*args, **kwargs)
    if out is args[0] or not isinstance(out, Tensor):  # in place into the plain buffer: alike on every rank
        return buffer
    return ShardedTensor.wrap(out, replicated_spec(source.spec, out.dim()))


def _gather_ref(input, dim, index, *, sparse_grad=False):
    """Signature of torch.gather."""


@rule(torch.gather, Tensor.gather, any_operand=True)
def _gather(op: Op):
    """``x.gather(dim, index)`` (Kandinsky 6's NABLA mask puts its sorted scores back in key order):
    ``out[i][j] = x[i][index[i][j]]`` along ``dim``, so each of the index's rows reads the same row of
    x. The output is sharded as the index. x's shards along ``dim`` (the values are read from any
    position) and those the index's do not line up with are gathered whole (logged); a whole x is
    sliced to the index's rows on its other sharded dims."""
    if "out" in op.kwargs:
        raise op.refuse("gather with out=", None, "assign the result instead")
    a = bind(op, _gather_ref)
    x, index = a["input"], a["index"]
    dim = a["dim"] % max(x.dim(), 1)
    rows = index.spec.sharded if isinstance(index, ShardedTensor) else {}
    if isinstance(x, ShardedTensor) and x.spec.sharded:
        x = whole_along(op, x, [d for d, s in x.spec.dims if d == dim or d not in rows or not rows[d].same(s)])
    own = x.spec.sharded if isinstance(x, ShardedTensor) else {}
    local = as_local(x)
    for d, shard in rows.items():
        if d == dim or d in own:
            continue
        if local.shape[d] < shard.total:
            raise op.refuse(f"an input of length {local.shape[d]} along dim {d}, shorter than the index's global "
                            f"length {shard.total} there", d, "give the input at least the index's length there")
        local = local.narrow(d, shard.start, shard.local)
    out = torch.gather(local, dim, as_local(index), sparse_grad=a["sparse_grad"])
    like = index if rows else next(t for t in (a["input"], index) if isinstance(t, ShardedTensor))
    return ShardedTensor.wrap(out, like.spec if rows else replicated_spec(like.spec, out.dim()))


def _scatter_add_ref(input, dim, index, src):
    """Signature of scatter_add."""


@rule(Tensor.scatter_add, torch.scatter_add, Tensor.scatter_add_, any_operand=True)
def _scatter_add(op: Op):
    """``x.scatter_add(dim, index, src)`` into a sharded ``x`` with a whole index and source (Cosmos 3 adds
    timestep embeddings to its noisy frames' packed tokens): along the sharded dim each rank adds the
    elements whose target lies in its part (the others add zero at its first row); along another dim,
    index and source of ``x``'s global length on the sharded dims are sliced to the rank's part. A
    sharded index or source is refused."""
    a = bind(op, _scatter_add_ref)
    x, index, src = a["input"], a["index"], a["src"]
    if not _sharded_only(op, x, index=index, source=src):
        return replicated_or_refuse(op)
    dim = a["dim"] % x.dim()
    index, src, local = as_local(index), as_local(src), x.as_subclass(Tensor)
    for d, shard in x.spec.dims:
        if d == dim:
            continue
        if index.shape[d] != shard.total or src.shape[d] != shard.total:
            raise op.refuse(f"an index or source of length {index.shape[d]} along sharded dim {d} (global length "
                            f"{shard.total})", d, "give the index and source the global length there")
        index, src = index.narrow(d, shard.start, shard.local), src.narrow(d, shard.start, shard.local)
    shard = x.spec.sharded.get(dim)
    if shard is not None:  # only the targets in this rank's part; the others add zero at its first row
        mine = (index >= shard.start) & (index < shard.start + shard.local)
        index = torch.where(mine, index - shard.start, torch.zeros_like(index))
        src = torch.where(mine, src, torch.zeros_like(src))
        if not shard.local:  # nothing lands here: the source stays in the graph (a zero gradient)
            out = local + (src.sum() * 0).to(local.dtype)
            return x if op.func is Tensor.scatter_add_ else ShardedTensor.wrap(out, x.spec)
    out = op.run(local, dim, index, src)
    return x if op.func is Tensor.scatter_add_ else ShardedTensor.wrap(out, x.spec)
