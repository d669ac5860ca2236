"""Helpers every rule uses: binding an op's arguments, the output's sharded dims, localising operands,
sums over the mesh, and running a kernel on a piece that may be empty.

Ops that act along unsharded dims only run on each rank's piece, empty pieces included.

Many ATen kernels reject a zero-length dim other than the batch (``F.interpolate``, reflect
``F.pad``, ``instance_norm``): on a rank whose piece is empty along the sharded dim they would raise
while the other ranks, and one process, compute. ``on_piece`` runs such a kernel on one zero
position instead and keeps none of its output along that dim: the result is the empty piece of the
right shape, in the autograd graph (weights get a zero gradient from it), decided from the spec
alike on every rank.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from nonlocal_dist.distributed.collectives import all_reduce, gather_dim
from nonlocal_dist.distributed.mesh import covered
from nonlocal_dist.sharded.fetch import reshard
from nonlocal_dist.sharded.spec import Shard
from nonlocal_dist.sharded.tensor import (
    Op,
    ShardedTensor,
    as_local,
    map_leaves,
    user_frame,
)


def on_piece(fn: Callable[[Tensor], Tensor], local: Tensor, dims) -> Tensor:
    """``fn(local)`` for ``fn`` that keeps each of ``dims`` (the sharded dims of ``local``, shape
    ``(..., L_r, ...)``) in place, counted from the end (a broadcast may add leading dims), and acts
    along the others; empty along one of them: an empty result."""
    empty = [d for d in dims if local.shape[d] == 0]
    for d in empty:
        shape = list(local.shape)
        shape[d] = 1
        local = torch.cat([local, local.new_zeros(shape)], d)
    out = fn(local)
    for d in empty:  # every output (sort's values and indices too)
        out = map_leaves(lambda o, d=d: o.narrow(d + o.dim() - local.dim(), 0, 0) if isinstance(o, Tensor) else o, out)
    return out


@functools.cache
def _signature(reference) -> inspect.Signature:
    return inspect.signature(reference)


@functools.cache
def _binding(reference, positional: int, keywords: tuple[str, ...]) -> tuple[tuple[str, str, object], ...]:
    """How to bind ``positional`` arguments and ``keywords`` to ``reference``'s parameters, in its order:
    ``(name, "arg", index)``, ``(name, "kw", name)`` or ``(name, "default", value)``. Raises the
    ``TypeError`` of ``inspect.Signature.bind`` for a call the signature does not take."""
    signature = _signature(reference)
    signature.bind(*range(positional), **dict.fromkeys(keywords))
    plan = []
    for i, (name, p) in enumerate(signature.parameters.items()):
        if i < positional:
            plan.append((name, "arg", i))
        elif name in keywords:
            plan.append((name, "kw", name))
        else:
            plan.append((name, "default", p.default))
    return tuple(plan)


def bind(op: Op, reference) -> dict:
    """The op's arguments by name, defaults filled (``reference``: a function with the op's signature,
    no ``*args``/``**kwargs``). The binding is worked out once per signature and call shape."""
    plan = _binding(reference, len(op.args), tuple(op.kwargs))
    return {name: op.args[where] if how == "arg" else op.kwargs[where] if how == "kw" else where
            for name, how, where in plan}


def per_dim(value, n: int) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def spatial_dims(x: ShardedTensor, n: int, op: Op) -> dict[int, int]:
    """Sharded dims of a (B, C, *n spatial) input -> spatial index. A sharded batch dim (frames folded
    into the batch, ``(b t) c h w``) is not among them: the layer acts on each rank's rows as they
    are. A sharded channel dim is refused."""
    out = {}
    for d, _ in x.spec.dims:
        if d < x.dim() - n - 1:
            continue
        if d < x.dim() - n:
            raise op.refuse(f"dim {d} is not one of its {n} spatial dims", d,
                            "shard a spatial dim (the ones the window slides over)")
        out[d] = d - (x.dim() - n)
    return out


def output_dims(op: Op, ndim: int) -> dict[int, Shard]:
    """The output's sharded dims (right-aligned broadcasting): each as the first sharded operand
    splits it. An operand split differently over the same group and length is resharded to it by
    ``localise`` (a U-Net skip meeting its upsampled decoder path); other mismatches are refused."""
    dims: dict[int, Shard] = {}
    for t in op.sharded():
        for d, shard in t.spec.dims:
            od = d + ndim - t.dim()
            if od not in dims:
                dims[od] = shard
            elif dims[od].group is not shard.group or dims[od].total != shard.total:
                raise op.refuse(
                    f"its operands are sharded over different groups or lengths along output dim {od} "
                    f"({dims[od]} vs {shard})", od, "compute them from the same sharded input",
                )
    return dims


def one_dim_per_group(op: Op, ndim: int) -> Op:
    """``op`` with every operand that would shard a second output dim over a group already sharding
    another one gathered whole along that dim (an outer sum of two sharded vectors: one side is
    gathered, the result stays sharded along the first; tokens merged over a mesh's span meeting the
    video they came from, sharded over its dims: the video gathered), or one output dim over two
    groups (frames split over the span against frames split over t: the second gathered). Decided
    from the specs: every rank gathers alike."""
    used: dict[int, int] = {}  # id(group) -> the output dim it shards (a mesh's span: each of its dims' too)
    owner: dict[int, int] = {}  # output dim -> id of the group sharding it
    swap: dict[int, Tensor] = {}
    for t in op.sharded():
        keep = {}
        for d, shard in t.spec.dims:
            od = d + ndim - t.dim()
            ids = covered(shard.group)
            if all(used.get(i, od) == od for i in ids) and owner.setdefault(od, id(shard.group)) == id(shard.group):
                used.update(dict.fromkeys(ids, od))
                keep[d] = shard
        if len(keep) < len(t.spec.dims) and id(t) not in swap:
            local = t.as_subclass(Tensor)
            for d, shard in t.spec.dims:
                if d not in keep:
                    local = gather_dim(local, d, list(shard.sizes), shard.group)
            swap[id(t)] = ShardedTensor.wrap(local, t.spec.remap(t.dim(), keep))
    if not swap:
        return op
    args, kwargs = (map_leaves(lambda a: swap.get(id(a), a), tree) for tree in (op.args, op.kwargs))
    return Op(op.func, args, kwargs)


def localise(op: Op, t, dims: dict[int, Shard], ndim: int):
    """Operand ``t`` as this rank needs it: sharded dims kept; global-length dims sliced; length 1 kept.
    A sharded operand needing nothing is returned itself (a rule runs torch ops on it as it is)."""
    if not isinstance(t, Tensor):
        return t
    own = t.spec.sharded if isinstance(t, ShardedTensor) else {}
    base = t  # torch functions are off in a rule: narrow gives a plain tensor (no alias node)
    for od, shard in dims.items():
        d = od - ndim + t.dim()
        if d < 0:
            continue
        if d in own:
            if not own[d].same(shard):  # decided from the specs: every rank joins the exchange
                base = reshard(as_local(base), d, own[d].sizes, shard.sizes, shard.group, shard.rank)
            continue
        length = base.shape[d]
        if length == shard.total:  # total 1 too: a join (cat) does not broadcast
            base = base.narrow(d, shard.start, shard.local)
        elif length != 1:
            raise op.refuse(
                f"an operand of length {length} along dim {d} meets an activation sharded there with global length "
                f"{shard.total}; only the global length (sliced to each rank's part) or 1 (broadcast) line up", od,
                f"give that operand length {shard.total} or 1 along that dim",
            )
    return base


def global_count(x: ShardedTensor, dims: list[int]) -> int:
    """The number of values a reduction over ``dims`` of the global tensor combines."""
    shape = x.spec.global_shape(x.shape)  # x.shape is the local one inside a rule
    return math.prod(shape[d] for d in dims)


def sum_over_groups(t: Tensor, shards: list[Shard]) -> Tensor:
    """Differentiable sum of ``t`` over the groups of ``shards`` (one all-reduce per mesh dim)."""
    for shard in shards:
        if shard.world > 1:
            t = all_reduce(t, shard.group)
    return t


_log = logging.getLogger("nonlocal_dist.sharded")
_LOGGED: set[str] = set()


def log_once(site: str, message: str) -> None:
    """``message`` at INFO on logger ``nonlocal_dist.sharded``, once per call site (the user's source
    line): where the runtime moves positions between ranks to run an op exactly (a reshard)."""
    if site not in _LOGGED:
        _LOGGED.add(site)
        _log.info("%s at %s", message, site)



def whole_along(op: Op, x: ShardedTensor, dims: list[int]) -> ShardedTensor:
    """x with each of its sharded ``dims`` gathered whole on every rank of its group (one differentiable
    all-gather per dim, whose backward sums the ranks' gradients), those dims no longer sharded:
    where an op needs every position of a sharded dim (an integer index, a squeeze of a length-1
    dim, ``repeat`` along it). Logged once per call site with the bytes gathered."""
    sharded = x.spec.sharded
    dims = [d for d in dims if d in sharded]
    if not dims:
        return x
    local = x.as_subclass(Tensor)
    for d in dims:
        shard = sharded.pop(d)
        if shard.total > 1:
            log_once(user_frame(), f"{op.name} needs sharded dim {d} whole: gathered on every rank, about "
                                   f"{row_bytes(local, d) * shard.total} bytes per rank per call")
        local = gather_dim(local, d, list(shard.sizes), shard.group)
    return ShardedTensor.wrap(local, x.spec.remap(x.dim(), sharded))


def gather_unaligned(op: Op, t, dims: dict[int, Shard], ndim: int):
    """Operand ``t`` with every shard that ``dims`` (the result's sharded dims, right-aligned to ``ndim``)
    does not hold over the same group gathered whole (``whole_along``), so that ``localise`` never
    takes a part of it for the whole; ``t`` as it is where nothing strays (a plain tensor too)."""
    if not isinstance(t, ShardedTensor):
        return t
    lead = ndim - t.dim()
    return whole_along(op, t, [d for d, s in t.spec.dims if d + lead not in dims or dims[d + lead].group is not s.group])


def reshard_bytes(t: Tensor, dim: int, sizes, to_sizes) -> int:
    """About the bytes a reshard of ``t``'s ``dim`` from ``sizes`` to ``to_sizes`` moves over the group."""
    return row_bytes(t, dim) * sum(abs(a - b) for a, b in zip(sizes, to_sizes)) // 2


def row_bytes(t: Tensor, dim: int) -> int:
    """The bytes of one position of ``t`` along ``dim`` (what moving one position costs)."""
    return t.numel() // max(t.shape[dim], 1) * t.element_size()
