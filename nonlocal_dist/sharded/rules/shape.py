"""Sizes, views and dim moves: the global shape seen by the network, the sharded dim tracked.

``x.shape`` and ``x.size()`` are global. ``view``/``reshape``/``flatten``/``unflatten`` take global
target shapes (einops computes them from the global shape); a sharded dim merged with others stays
sharded when it is the outermost factor of the merge (each rank's positions remain one contiguous
block), and a split keeps the outer factor sharded when every rank's length divides by the inner
ones. A merge under outer dims (``(b t)``, b > 1) moves the shard outermost in a ``reshape`` (one
all-to-all); a ``view``, which cannot copy, folds it instead (``spec.Strided``: each rank's rows as
they are, an alias), and any reshape of a folded dim folds again. A split whose inner factor does
not divide every rank's length moves the shard boundaries onto its grid first (one all-to-all,
logged). torch's view ops (``view``, ``view_as``, ``unflatten``) always alias their input: where the
runtime must copy instead (that move, a merged mesh dim split back), a write into the result, or
into its input while the result lives, is refused (``tensor.REGROUPED``, ``SLICED_AS_COPIES``).
Anything else is refused. ``permute``/``transpose``/``movedim``/``squeeze``/``unsqueeze``
move the spec with the dims; squeezing a sharded dim of length 1, or ``repeat`` tiling a sharded
dim, gathers that dim whole first (logged once per call site); ``repeat_interleave`` by one count
repeats each rank's positions in place.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.distributed as dist
from torch import Tensor

import nonlocal_dist.distributed.failure as failure
from nonlocal_dist.distributed.collectives import gather_dim, move_shard
from nonlocal_dist.distributed.mesh import span_coordinates, span_group
from nonlocal_dist.distributed.shards import split_sizes, starts
from nonlocal_dist.sharded.fetch import reshard
from nonlocal_dist.sharded.rules.common import (
    bind,
    log_once,
    reshard_bytes,
    whole_along,
)
from nonlocal_dist.sharded.spec import Merged, Shard, Strided, folded
from nonlocal_dist.sharded.tensor import (
    REGROUPED,
    SLICED_AS_COPIES,
    Op,
    ShardedTensor,
    as_local,
    rule,
    user_frame,
)


def _self(op: Op) -> ShardedTensor:
    return op.args[0]


def global_shape(t: Tensor) -> tuple[int, ...]:
    return t.spec.global_shape(t.shape) if isinstance(t, ShardedTensor) else tuple(t.shape)


@rule(("property", "shape"), Tensor.size)
def _size(op: Op):
    shape = torch.Size(global_shape(_self(op)))
    dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
    return shape if dim is None else shape[dim]


@rule(Tensor.numel, torch.numel)
def _numel(op: Op):
    return math.prod(global_shape(_self(op)))


@rule(Tensor.__len__)
def _len(op: Op):
    return global_shape(_self(op))[0]


@rule(("property", "ndim"), Tensor.dim, Tensor.ndimension)
def _dim(op: Op):
    return _self(op).dim()


def _wrap(op: Op, out: Tensor, dims: dict[int, Shard]) -> ShardedTensor:
    return ShardedTensor.wrap(out, _self(op).spec.remap(out.dim(), dims))


def _resolve(shape, numel: int) -> list[int]:
    shape = [int(s) for s in shape]
    if shape.count(-1) == 1:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = numel // known if known else 0
    return shape


def _blocks(src: list[int], dst: list[int]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """``_aligned_blocks`` of the two shapes (worked out once per pair of shapes: a network reshapes
    alike at every layer and step)."""
    return _aligned_blocks(tuple(src), tuple(dst))


@functools.lru_cache(maxsize=4096)
def _aligned_blocks(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Split two shapes of equal numel (no zeros) into aligned blocks (src dims, dst dims) of equal products.

    A length-1 dim facing a longer one joins the block before it where that block is all length 1:
    ``(b t) c`` with b == t == 1 is the block (b, t) -> (b t), not (t, c) -> c (frames folded into the
    batch stay the batch's), while ``c (t two)`` with t == 1 keeps t the outer factor of (t two)."""
    blocks, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        ones = bool(blocks) and math.prod(src[k] for k in blocks[-1][0]) == 1
        if ones and i < len(src) and src[i] == 1 and (j == len(dst) or dst[j] != 1):
            blocks[-1][0].append(i)
            i += 1
            continue
        if ones and j < len(dst) and dst[j] == 1 and (i == len(src) or src[i] != 1):
            blocks[-1][1].append(j)
            j += 1
            continue
        a, b, pa, pb = [], [], 1, 1
        if i < len(src):
            a, pa, i = [i], src[i], i + 1
        if j < len(dst):
            b, pb, j = [j], dst[j], j + 1
        while pa != pb:
            if pa < pb:
                a.append(i)
                pa, i = pa * src[i], i + 1
            else:
                b.append(j)
                pb, j = pb * dst[j], j + 1
        blocks.append((a, b))
    return tuple((tuple(a), tuple(b)) for a, b in blocks)


def reshape_spec(op: Op, src: list[int], dst: list[int], sharded: dict[int, Shard],
                 resharded: dict[int, tuple[int, ...]] | None = None, view: bool = False) -> dict[int, Shard]:
    """The dst dims' shards for a reshape of global shape ``src`` (sharded as given) to ``dst``.

    Where a split of a sharded dim needs every rank's length to be a multiple of its inner factor
    and it is not: with ``resharded`` (a dict to fill), the dim's new split (as even as possible on
    that grid) goes there and the caller reshards before reshaping; without it, a refusal. With
    ``view``, a merge of outer dims with a sharded one gives a ``Strided`` shard (each rank's rows
    stay where they are); without it, the caller has moved the shard outermost first."""
    if 0 in src:
        raise op.refuse("a reshape of an empty tensor")
    out: dict[int, Shard] = {}
    blocks = _blocks(src, dst)
    for i, (a, b) in enumerate(blocks):
        inside = [d for d in a if d in sharded]
        if not inside:
            continue
        d = inside[0]
        if (len(sharded) == 1 and src[d] == 1 and sharded[d].held_by_one() and a[0] == d and len(a) > 1 and i
                and blocks[i - 1] == ((0,), (0,)) and dst[0] != 1):
            # One frame held by one rank, folded into a batch of several (``(b t) c h w`` of a first frame):
            # that rank holds the whole tensor, as the batch's rows, not as the channels it precedes.
            out[0] = sharded[d].with_sizes(n * dst[0] for n in sharded[d].sizes)
            continue
        outer = math.prod(src[k] for k in a if k < d)
        fold = 1
        if view and len(inside) == 1 and outer != 1 and not sharded[d].held_by_one():
            fold, outer = outer, 1  # a view merging outer dims with it: a strided shard (no copy, an alias)
        if len(inside) > 1 or (outer != 1 and not sharded[d].held_by_one()):  # one rank's whole dim merges as it is
            raise op.refuse(
                f"it merges sharded dim {d} with the outer dim(s) {[k for k in a if k < d and src[k] != 1]}: each rank's "
                "positions would not be one contiguous block", d,
                "move the sharded dim outermost of the merge first (permute), as '(t h w)' in einops",
            )
        inner = math.prod(src[k] for k in a if k > d) * outer  # one rank holding it all: the whole block
        shard = sharded[d]
        flat = [s * inner for s in shard.sizes]
        target = next((k for k in b if dst[k] != 1), None)
        if target is None and b:  # all length 1: the dim as far from the end as the source's ((b t) -> b, t)
            target = next((k for k in b if len(dst) - k == len(src) - d), b[0])
        if target is None or math.prod(dst[k] for k in b if k < target) != 1:
            raise op.refuse(f"no dim of the result carries the sharded positions of dim {d}", d)
        below = math.prod(dst[k] for k in b if k > target)
        if any(s % below for s in flat) and resharded is not None and (shard.total * inner) % below == 0:
            unit = below // math.gcd(below, inner)
            resharded[d] = split_sizes(shard.total, shard.world, unit)
            shard = shard.with_sizes(resharded[d])
            flat = [s * inner for s in shard.sizes]
        if any(s % below for s in flat):
            raise op.refuse(
                f"it splits sharded dim {d} into factors whose inner part ({below} positions) does not divide every "
                f"rank's {[s * inner for s in shard.sizes]} positions", d,
                f"shard so that every rank's length is a multiple of {below // math.gcd(below, inner)}",
            )
        out[target] = folded(shard.with_sizes(s // below for s in flat), fold)
    return out


def _span_in_mesh_order(outer: Shard, inner: Shard) -> dist.ProcessGroup | None:
    """The process group spanning the two mesh dims of ``outer`` and ``inner`` where its ranks run
    outer-major (rank a * inner.world + b at mesh coordinates (a, b): pieces of a merged dim are then
    contiguous in its rank order); None where they do not."""
    groups = (outer.group, inner.group)
    order = [(q // inner.world, q % inner.world) for q in range(outer.world * inner.world)]
    return span_group(groups) if list(span_coordinates(groups)) == order else None


def _outermost_sharded(op: Op, x: ShardedTensor, src: list[int], dst: list[int]) -> tuple[ShardedTensor, list]:
    """x with the shard of each merge whose sharded dim is not its outermost factor (``(t h)`` with h
    sharded) moved to that outermost dim, split evenly (one all-to-all, logged once per call site):
    each rank's merged positions are then one contiguous block. Where a merge holds two sharded dims
    (``(t h w)`` on a t x h mesh), the inner one is gathered whole first (logged); with the outer
    one outermost, its block merged into one dim and the mesh's span in order, the merge is also
    returned, ``(span group, outer shard, inner shard, block shape, outer index, inner index)``, for the caller to
    split the merged dim over the span (``_split_over_span``): every rank then works on its own part.
    Elsewhere the merged dim stays sharded over the outer group, the same on the inner one's ranks."""
    if 0 in src:
        return x, []
    merges = []
    for a, b in _blocks(src, dst):
        inside = [d for d in a if d in x.spec.sharded]
        if not inside:
            continue
        d = inside[0]
        outer = [k for k in a if src[k] != 1 and k < d]
        if len(inside) > 1:  # two sharded dims merged (t and h of a 2-D mesh): the inner ones gathered whole
            pair = [x.spec.sharded[k] for k in inside]
            span = (_span_in_mesh_order(*pair) if len(inside) == 2 and not outer and sum(dst[k] != 1 for k in b) == 1
                    and not any(s.held_by_one() for s in pair) else None)
            if span is not None:
                merges.append((span, *pair, tuple(src[k] for k in a), a.index(inside[0]), a.index(inside[1])))
            x = whole_along(op, x, inside[1:])
        if not outer or x.spec.sharded[d].held_by_one():
            continue
        k = outer[0]
        shard = x.spec.sharded[d]
        sizes = split_sizes(src[k], shard.world)
        local = x.as_subclass(Tensor)
        log_once(user_frame(), f"{op.name} merges sharded dim {d} under dim {k}: the shard moved to dim {k} "
                               f"(split {list(sizes)}), about {local.numel() * local.element_size()} bytes per rank "
                               "per call")
        moved = move_shard(local, d, list(shard.sizes), k, list(sizes), shard.group)
        dims = x.spec.sharded
        del dims[d]
        dims[k] = shard.with_sizes(sizes)
        x = ShardedTensor.wrap(moved, x.spec.remap(x.dim(), dims))
    return x, merges


def _split_over_span(out: Tensor, dims: dict[int, Shard], merges: list) -> Tensor:
    """``out`` narrowed, for each merge, to this rank's part of its merged dim over the mesh's span
    (the outer line's frames split evenly among the inner group's ranks), ``dims`` updated: no
    communication (each rank of the inner group holds its line whole after the gather)."""
    for span, outer, inner, shape, outer_at, inner_at in merges:
        k = next(k for k, s in dims.items() if s.group is outer.group)
        record = Merged(shape, outer_at, outer, inner_at, inner)
        parts = record.line_parts(dims[k].sizes[outer.rank])
        out = out.narrow(k, starts(parts)[inner.rank], parts[inner.rank])
        dims[k] = Shard(span, record.span_sizes(), dist.get_rank(span), merged=record)
    return out


def _unmerge(op: Op, x: ShardedTensor, src: list[int], dst: list[int]) -> tuple[ShardedTensor, list]:
    """For each dim of x sharded over a span by a merge (``Shard.merged``) that this reshape splits back
    into the merged block's shape: the inner group's parts gathered into the outer line's positions
    (one all-gather over the inner group), the dim sharded over the outer group again; returned with
    ``(inner shard, index of the inner dim in dst)`` for the caller to narrow that dim back to this
    rank's piece (``_narrow_inner``)."""
    pending = []
    if 0 in src or not any(s.merged for _, s in x.spec.dims):
        return x, pending
    for a, b in _blocks(src, dst):
        inside = [d for d in a if d in x.spec.sharded and x.spec.sharded[d].merged is not None]
        if len(inside) != 1 or [dst[k] for k in b] != list(x.spec.sharded[inside[0]].merged.shape):
            continue
        d = inside[0]
        shard = x.spec.sharded[d]
        record = shard.merged
        lines = record.line_lengths()
        mine = record.line_parts(lines[record.outer.rank])
        local = gather_dim(x.as_subclass(Tensor), d, list(mine), record.inner.group)
        dims = x.spec.sharded
        dims[d] = record.outer.with_sizes(lines)
        x = ShardedTensor.wrap(local, x.spec.remap(x.dim(), dims))
        pending.append((record.inner, b[record.inner_at]))
    return x, pending


def _narrow_inner(out: Tensor, dims: dict[int, Shard], pending: list) -> Tensor:
    """``out`` narrowed along each restored inner dim to this rank's piece, that dim sharded again."""
    for inner, k in pending:
        out = out.narrow(k, inner.start, inner.local)
        dims[k] = inner
    return out


@functools.lru_cache(maxsize=4096)
def _kept_dims(src: tuple[int, ...], dst: tuple[int, ...], sharded: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    """``(src dim, dst dim)`` for each sharded dim where the reshape keeps every one of them a dim of
    its own, of the same length (a heads ``unflatten`` of the channels, a ``flatten`` of trailing
    dims: nothing moves, each rank reshapes its piece); None where one takes part in a merge or split."""
    kept = []
    for a, b in _aligned_blocks(src, dst):
        inside = [d for d in a if d in sharded]
        if not inside:
            continue
        longer = [k for k in b if dst[k] != 1]
        if len(inside) > 1 or [src[k] for k in a if k != inside[0]] != [1] * (len(a) - 1) or len(longer) != 1:
            return None
        kept.append((inside[0], longer[0]))
    return tuple(kept)


def _unfolded(x: ShardedTensor, src: list[int]) -> tuple[ShardedTensor, list[int]]:
    """x with each ``Strided`` dim split back into its ``(fold, base)`` dims, the second sharded as
    ``base`` (a view of the local rows, which are block-major), and that global shape: a reshape of
    a folded dim is then one of plain shards."""
    local, glob, dims = [], [], {}
    sharded = x.spec.sharded
    for d, n in enumerate(x.shape):  # the local shape inside a rule
        shard = sharded.get(d)
        if isinstance(shard, Strided):
            local += [shard.fold, shard.base.local]
            glob += [shard.fold, shard.base.total]
            dims[len(local) - 1] = shard.base
            continue
        if shard is not None:
            dims[len(local)] = shard
        local.append(n)
        glob.append(src[d])
    out = x.as_subclass(Tensor).view(local)  # splitting a dim in two is a view whatever the strides
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), dims)), glob


# torch's view ops among the reshapes: their result is always an alias of the input (``flatten`` and
# ``reshape`` may copy). Where the runtime must copy (a split off the shard grid, a merged mesh dim split
# back), writes into the result or the input are refused while both live.
_ALIASING = frozenset({"view", "view_as", "unflatten"})


def _reshape_to(op: Op, target) -> ShardedTensor:
    x = _self(op)
    src = list(global_shape(x))
    dst = _resolve(target, math.prod(src))
    if math.prod(dst) != math.prod(src):
        raise op.refuse(f"shape {tuple(dst)} is invalid for a tensor of global shape {tuple(src)}")
    method = getattr(op.func, "__name__", "reshape")
    # A folded (``Strided``) dim is folded again, not moved: a reshape, as torch's, is then a view of each
    # rank's rows where their strides allow and no split leaves the shard grid (the spec does not depend
    # on strides).
    view = method == "view" or x.spec.strided
    if x.spec.strided:
        x, src = _unfolded(x, src)
    unfolded = x
    shards = x.spec.dims
    kept = None if 0 in src or any(s.merged for _, s in shards) else _kept_dims(
        tuple(src), tuple(dst), tuple(d for d, _ in shards))
    merges, pending, resharded = [], [], {}
    if kept is not None:  # the common case, decided once per shapes: every rank reshapes its piece
        own = dict(shards)
        dims = {k: own[d].with_sizes(own[d].sizes) for d, k in kept}  # a pad's lead/trail not carried, as reshape_spec
    else:
        if not view:
            x, pending = _unmerge(op, x, src, dst)
            x, merges = _outermost_sharded(op, x, src, dst)
        dims = reshape_spec(op, src, dst, x.spec.sharded, resharded, view)
    # Decided from the spec, alike on every rank: the result is a copy, not an alias of the input.
    copied = bool(resharded) or x is not unfolded
    aliasing = method in _ALIASING
    local_target = [dims[k].local if k in dims else s for k, s in enumerate(dst)]
    base = x  # torch functions are off in a rule: view/reshape give a plain tensor (no alias node)
    for d, sizes in resharded.items():  # boundaries moved onto the reshape's grid
        shard = x.spec.sharded[d]
        moved = reshard_bytes(base, d, shard.sizes, sizes)
        copy = (" (the view is of that copy: writes into it or its source are refused while it lives)"
                if aliasing else "")
        log_once(user_frame(), f"{op.name} splits sharded dim {d} into factors off the shard boundaries "
                               f"{list(shard.sizes)}: resharded to {list(sizes)}, about {moved} bytes moved per call"
                               + copy)
        base = reshard(as_local(base), d, shard.sizes, sizes, shard.group, shard.rank)
    if resharded and method == "view":  # the reshard's copy has the moved dim outermost in memory
        base = base.contiguous()
    out = base.view(local_target) if method == "view" else base.reshape(local_target)
    if copied and aliasing:  # not an alias of the input: neither may be written into while both live
        REGROUPED.add(out.untyped_storage())
        SLICED_AS_COPIES.setdefault(_self(op).untyped_storage(), weakref.WeakSet()).add(out.untyped_storage())
    out = _narrow_inner(_split_over_span(out, dims, merges), dims, pending)
    return _wrap(op, out, dims)


def _shape_args(args) -> list[int]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0])
    return list(args)


@rule(Tensor.view, Tensor.reshape, torch.reshape)
def _view(op: Op):
    rest = op.args[1:] or (op.kwargs.get("shape") or op.kwargs.get("size"),)
    if len(rest) == 1 and isinstance(rest[0], torch.dtype):
        raise op.refuse("a view as another dtype", fix="cast with .to(dtype)")
    return _reshape_to(op, _shape_args(rest))


@rule(Tensor.view_as, Tensor.reshape_as, any_operand=True)
def _view_as(op: Op):
    x, other = op.args[:2]
    if not isinstance(x, ShardedTensor):  # only the target's global shape is read: a plain result
        method = "view" if getattr(op.func, "__name__", "") == "view_as" else "reshape"
        return getattr(x, method)(global_shape(other))
    return _reshape_to(op, global_shape(other))


@rule(Tensor.flatten, torch.flatten)
def _flatten(op: Op):
    x = _self(op)
    shape = list(global_shape(x))
    start = op.args[1] if len(op.args) > 1 else op.kwargs.get("start_dim", 0)
    end = op.args[2] if len(op.args) > 2 else op.kwargs.get("end_dim", -1)
    if not shape:
        return _reshape_to(op, [1])
    start, end = start % len(shape), end % len(shape)
    return _reshape_to(op, shape[:start] + [math.prod(shape[start : end + 1])] + shape[end + 1 :])


@rule(Tensor.unflatten, torch.unflatten)
def _unflatten(op: Op):
    x = _self(op)
    shape = list(global_shape(x))
    dim = op.args[1] if len(op.args) > 1 else op.kwargs["dim"]
    sizes = list(op.args[2] if len(op.args) > 2 else op.kwargs["sizes"])
    dim %= len(shape)
    sizes = _resolve(sizes, shape[dim])
    return _reshape_to(op, shape[:dim] + sizes + shape[dim + 1 :])


def _permuted(op: Op, order: list[int]) -> ShardedTensor:
    x = _self(op)
    order = [d % x.dim() for d in order]
    sharded = x.spec.sharded
    dims = {new: sharded[old] for new, old in enumerate(order) if old in sharded}
    return _wrap(op, x.permute(order), dims)


@rule(Tensor.permute, torch.permute)
def _permute(op: Op):
    return _permuted(op, _shape_args(op.args[1:] or (op.kwargs["dims"],)))


@rule(Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes, Tensor.swapdims, torch.swapdims)
def _transpose(op: Op):
    x = _self(op)
    a = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim0")
    b = op.args[2] if len(op.args) > 2 else op.kwargs.get("dim1")
    order = list(range(x.dim()))
    a, b = a % x.dim(), b % x.dim()
    order[a], order[b] = order[b], order[a]
    return _permuted(op, order)


@rule(("property", "T"), ("property", "mT"), Tensor.t, torch.t)
def _t(op: Op):
    x = _self(op)
    order = list(range(x.dim()))
    if getattr(op.func, "__self__", None) is not None and op.func.__self__.__name__ == "T":
        order = order[::-1]
    elif x.dim() >= 2:
        order[-1], order[-2] = order[-2], order[-1]
    return _permuted(op, order)


@rule(Tensor.movedim, torch.movedim, Tensor.moveaxis, torch.moveaxis)
def _movedim(op: Op):
    x = _self(op)
    src = op.args[1] if len(op.args) > 1 else op.kwargs["source"]
    dst = op.args[2] if len(op.args) > 2 else op.kwargs["destination"]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    n = x.dim()
    src, dst = [s % n for s in src], [d % n for d in dst]
    order = [None] * n
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(k for k in range(n) if k not in src)
    order = [next(rest) if o is None else o for o in order]
    return _permuted(op, order)


@rule(Tensor.unsqueeze, torch.unsqueeze)
def _unsqueeze(op: Op):
    x = _self(op)
    dim = op.args[1] if len(op.args) > 1 else op.kwargs["dim"]
    dim = dim % (x.dim() + 1)
    dims = {(d + (d >= dim)): s for d, s in x.spec.dims}
    return _wrap(op, x.as_subclass(Tensor).unsqueeze(dim), dims)


@rule(torch.view_as_complex, torch.view_as_real)
def _complex_view(op: Op):
    """``view_as_complex`` (a last dim of 2 -> complex) and ``view_as_real`` (complex -> a last dim of 2,
    rotary embeddings written with complex products: AnyFlow, SANA-WM): each position's numbers as
    they are; the sharded dims stay (the last one, the pair, is never sharded)."""
    x = _self(op)
    if op.func is torch.view_as_complex and x.dim() - 1 in x.spec.sharded:
        raise op.refuse("it pairs the sharded last dim", x.dim() - 1, "shard another dim than the (real, imag) pair")
    return _wrap(op, op.run(x), x.spec.sharded)


@rule(Tensor.squeeze, torch.squeeze)
def _squeeze(op: Op):
    x = _self(op)
    shape = global_shape(x)
    dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
    if dim is None:
        chosen = [d for d, s in enumerate(shape) if s == 1]
    else:
        given = [d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)]
        if len(set(given)) < len(given):
            raise failure.everywhere(RuntimeError(f"dim {given} appears multiple times in the list of dims"))
        chosen = [d for d in given if shape[d] == 1]
    x = whole_along(op, x, chosen)  # a sharded dim of length 1: its one position, on every rank
    keep = [d for d in range(x.dim()) if d not in chosen]
    dims = {keep.index(d): s for d, s in x.spec.dims}
    local = x.as_subclass(Tensor)
    for d in sorted(chosen, reverse=True):
        local = local.squeeze(d)
    return _wrap(op, local, dims)


@rule(Tensor.repeat)
def _repeat(op: Op):
    """Tiles along a sharded dim need all its positions: that dim is gathered whole first (logged);
    a factor of 1 keeps it sharded, as do new leading dims."""
    x = _self(op)
    reps = _shape_args(op.args[1:]) if len(op.args) > 1 else _shape_args((op.kwargs["repeats"],))
    extra = len(reps) - x.dim()
    if extra < 0:
        raise failure.everywhere(RuntimeError(
            "Number of dimensions of repeat dims can not be smaller than number of dimensions of tensor"))
    x = whole_along(op, x, [d for d in x.spec.sharded if reps[d + extra] != 1])
    out = x.as_subclass(Tensor).repeat(reps)
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), {d + extra: s for d, s in x.spec.dims}))


def _repeat_interleave_ref(input, repeats=None, dim=None, *, output_size=None):
    """Signature of torch.repeat_interleave."""


@rule(Tensor.repeat_interleave, torch.repeat_interleave)
def _repeat_interleave(op: Op):
    """Along an unsharded dim: on each rank's piece. Along a sharded dim by one count k: each rank's
    positions repeated in place, the shard lengths times k (no communication)."""
    a = bind(op, _repeat_interleave_ref)
    x, repeats, dim = a["input"], a["repeats"], a["dim"]
    if dim is None:
        raise op.refuse("repeat_interleave with no dim (it flattens the sharded dims)", fix="give dim=")
    dim %= x.dim()
    shard = x.spec.sharded.get(dim)
    count = repeats if not isinstance(repeats, Tensor) else int(repeats) if repeats.numel() == 1 else None
    if shard is not None and count is None:
        raise op.refuse("per-position counts along a sharded dim", dim, "repeat by one count, or before sharding")
    local = x.as_subclass(Tensor)
    if shard is None:
        out = local.repeat_interleave(repeats, dim)
        return _wrap(op, out, x.spec.sharded)
    out = local.repeat_interleave(count, dim)
    dims = x.spec.sharded
    dims[dim] = shard.with_sizes(n * count for n in shard.sizes)
    return _wrap(op, out, dims)


@rule(Tensor.expand, Tensor.broadcast_to, torch.broadcast_to)
def _expand(op: Op):
    x = _self(op)
    target = _shape_args(op.args[1:] or (op.kwargs.get("size"),))
    return _expand_to(op, x, target)


@rule(Tensor.expand_as, any_operand=True)
def _expand_as(op: Op):
    x, other = op.args[:2]
    target = list(global_shape(other))
    if not isinstance(x, ShardedTensor):  # only the target's global shape is read: a plain result
        return x.expand(target)
    return _expand_to(op, x, target)


def _expand_to(op: Op, x: ShardedTensor, target: list[int]) -> ShardedTensor:
    """A sharded dim keeps its length, or, of length 1 and so held by one rank (a first frame sliced
    off a sharded clip), is expanded on that rank alone: the other ranks' pieces stay empty."""
    lead = len(target) - x.dim()
    dims = {d + lead: s for d, s in x.spec.dims}
    for d, shard in list(dims.items()):
        if target[d] in (-1, shard.total):
            continue
        if shard.total != 1:
            raise op.refuse(f"expanding sharded dim {d - lead} of length {shard.total} to {target[d]}", d - lead)
        dims[d] = shard.with_sizes(target[d] * n for n in shard.sizes)
    local_target = [dims[d].local if d in dims else s for d, s in enumerate(target)]
    return _wrap(op, x.as_subclass(Tensor).expand(local_target), dims)


_METADATA = ["is_floating_point", "is_complex", "is_signed", "element_size", "get_device", "is_contiguous", "stride",
             "data_ptr", "storage_offset", "is_pinned", "is_shared", "untyped_storage", "register_hook",
             "backward", "__hash__", "__format__", "__bool__", "is_nonzero", "dim_order", "nbytes", "itemsize"]


@rule(*[getattr(Tensor, n) for n in _METADATA if hasattr(Tensor, n)], torch.is_floating_point, torch.is_complex,
      torch.autograd.backward,
      torch.is_tensor, any_operand=True)
def _metadata(op: Op):
    """Facts about the local tensor that do not depend on the global shape (dtype class, device, layout)."""
    return op.run(*op.args, **op.kwargs)


@rule(Tensor.new_ones, Tensor.new_zeros, Tensor.new_full, Tensor.new_tensor)
def _new_factory(op: Op):
    """``x.new_ones(n, n)`` (a causal mask over the frames): a plain tensor of the given shape with x's
    dtype and device, the same on every rank; x's sharding plays no part."""
    rest = [a.as_subclass(Tensor) if isinstance(a, ShardedTensor) else a for a in op.args[1:]]
    return op.run(_self(op).as_subclass(Tensor), *rest, **op.kwargs)


@rule(torch.pixel_shuffle, torch.pixel_unshuffle)
def _pixel_shuffle(op: Op):
    """``pixel_shuffle`` (*, C r², H, W) -> (*, C, H r, W r) and ``pixel_unshuffle``, its inverse: each r x r
    block of positions comes from one position and back. Along leading dims (frames folded into the
    batch) on each rank's rows; along a sharded H or W, shuffle multiplies each rank's length by r,
    and unshuffle divides it, its rows first resharded onto the r-grid where they are off it (one
    all-to-all, logged once per call site with its bytes). A sharded channel dim is refused."""
    x = op.args[0]
    factor = op.args[1] if len(op.args) > 1 else next(op.kwargs[k] for k in ("upscale_factor", "downscale_factor")
                                                      if k in op.kwargs)
    shuffle = getattr(op.func, "__name__", "") == "pixel_shuffle"
    n = x.dim()
    dims = x.spec.sharded
    if n - 3 in dims:
        raise op.refuse("the channel dim is sharded; the shuffle moves positions into and out of it", n - 3,
                        "shard a leading or a spatial dim")
    local = x.as_subclass(Tensor)
    for d in (n - 2, n - 1):
        shard = dims.get(d)
        if shard is None:
            continue
        if not shuffle and any(s % factor for s in shard.sizes) and shard.total % factor == 0:
            sizes = split_sizes(shard.total, shard.world, factor)
            log_once(user_frame(), f"{op.name} needs sharded dim {d} on its {factor}-grid, split {list(shard.sizes)}: "
                                   f"resharded to {list(sizes)}, about {reshard_bytes(local, d, shard.sizes, sizes)} "
                                   "bytes moved per call")
            local = reshard(local, d, shard.sizes, sizes, shard.group, shard.rank)
            shard = shard.with_sizes(sizes)
        if not shuffle and shard.total % factor:
            raise failure.everywhere(RuntimeError(
                f"pixel_unshuffle expects the height and width of the input to be divisible by downscale_factor, "
                f"but dim {d} has length {shard.total} and downscale_factor is {factor}"))
        dims[d] = shard.with_sizes(s * factor if shuffle else s // factor for s in shard.sizes)
    if local.numel():  # standard strides both ways: torch's kernels reject some size-1 layouts a piece can have
        out = _StandardGrad.apply(op.run(_standard(local), factor))
    else:  # torch returns an empty input's shape unchanged: the shape the rank's piece would have
        shape = list(local.shape)
        shape[-3] = shape[-3] // factor ** 2 if shuffle else shape[-3] * factor ** 2
        shape[-2:] = [s * factor if shuffle else s // factor for s in shape[-2:]]
        out = local.reshape(-1)[:0].reshape(shape)
    return _wrap(op, out, dims)


def _standard(t: Tensor) -> Tensor:
    """t with the standard (row-major) strides: a view where it is contiguous, else a copy."""
    return t.reshape(-1).view(t.shape) if t.is_contiguous() else t.contiguous()


class _StandardGrad(torch.autograd.Function):
    """The identity, whose backward hands the gradient on with the standard strides (``_standard``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _standard(grad)
