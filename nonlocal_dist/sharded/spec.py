"""Shard specs: which tensor dims are split over which process group, and every rank's part.

A ``Shard`` describes one tensor dim split into contiguous, rank-ordered pieces over one process
group (one mesh dim): every rank's length (uneven and empty pieces allowed), so every rank can
compute every other rank's offsets without communicating. A ``ShardSpec`` maps tensor dims to
shards; a spec with no sharded dims is *replicated* over its mesh (the same values on every rank,
as after a global pooling). Specs are the same on every rank (they describe the global tensor), so
any decision made from a spec is made alike everywhere: refusals raise on every rank together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch.distributed as dist

from nonlocal_dist.distributed.shards import even_sizes, starts


@dataclass(frozen=True, eq=False)
class Shard:
    """One tensor dim split over ``group``: rank r (of the group) holds ``sizes[r]`` positions from ``starts[r]``."""

    group: dist.ProcessGroup
    sizes: tuple[int, ...]
    rank: int = field(compare=False)
    # Positions a pad or a ``cat`` put in front of the first rank's part (a causal pad's k-1 frames):
    # the next sliding window anchors its outputs by it, so the shard boundaries do not drift. Ops
    # that keep every position where it is (element-wise ops, a permute) keep it; a result whose
    # shards are made anew (``with_sizes``: a reshape, a window) has none.
    lead: int = field(default=0, compare=False)
    # Positions ``F.pad`` put after the last rank's part (a right pad before a strided 'valid'
    # convolution): the window's anchor moves back by them, as for a layer padding itself. (Not a
    # ``cat`` suffix: that may be the real frames after a cache, as a prefix may be.)
    trail: int = field(default=0, compare=False)
    # A dim sharded over the span of two mesh dims by a merge of two sharded dims (``Merged``): a fact
    # about the split (which rank holds which positions), kept while the sizes stay (``with_sizes``).
    merged: Merged | None = field(default=None, compare=False)

    @cached_property
    def starts(self) -> tuple[int, ...]:
        return starts(self.sizes)

    @cached_property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    def with_sizes(self, sizes, lead: int = 0, trail: int = 0) -> Shard:
        sizes = tuple(int(s) for s in sizes)
        if sizes == self.sizes and lead == self.lead and trail == self.trail:
            return self  # frozen: nothing to change (a layer that keeps the length, at every layer)
        merged = self.merged if sizes == self.sizes else None  # the record depends on the split alone
        return Shard(self.group, sizes, self.rank, lead, trail, merged)

    def held_by_one(self) -> bool:
        """Whether one rank holds every position (a chunk or a token sliced off a sharded sequence)."""
        return sum(1 for s in self.sizes if s) <= 1

    def same(self, other: Shard) -> bool:
        """Same group and the same split (two tensors sharded alike along this dim)."""
        return self.group is other.group and self.sizes == other.sizes

    def __repr__(self) -> str:
        return f"Shard(sizes={list(self.sizes)})"  # the same text on every rank (refusals compare alike)


class PositionsNeeded(Exception):
    """A rule asked where a ``Strided`` shard's positions are: the dispatcher regroups that operand into
    a contiguous shard and runs the op again (``sharded.strided``)."""


@dataclass(frozen=True, eq=False)
class Strided:
    """A dim that a view merged from ``fold`` outer positions and a dim sharded as ``base`` (``(b t)``
    with t sharded: frames folded into the batch by ``x.view(b * t, ...)``), as DTensor's
    ``_StridedShard``: global length ``fold * base.total``; rank r holds, in each of the ``fold``
    blocks, ``base``'s positions of rank r, block-major. The local rows are then a view of the
    unmerged shard: the view moves nothing and stays an alias of it.

    A rule that acts on each rank's positions as they are (a per-frame conv or norm, attention with
    the frames in its batch, element-wise ops on operands folded alike, a sum over the dim) reads only
    ``group``, ``world``, ``rank``, ``local`` and ``total``, and runs on it unchanged. Asking where the
    positions are (``sizes``, ``starts``, ``start``, a new split) raises ``PositionsNeeded``: no rule
    can take the rows for a contiguous piece."""

    base: Shard
    fold: int
    lead: ClassVar[int] = 0
    trail: ClassVar[int] = 0
    merged: ClassVar[None] = None

    @property
    def group(self) -> dist.ProcessGroup:
        return self.base.group

    @property
    def rank(self) -> int:
        return self.base.rank

    @property
    def world(self) -> int:
        return self.base.world

    @property
    def local(self) -> int:
        return self.fold * self.base.local

    @property
    def total(self) -> int:
        return self.fold * self.base.total

    @property
    def sizes(self):
        raise PositionsNeeded

    @property
    def starts(self):
        raise PositionsNeeded

    @property
    def start(self):
        raise PositionsNeeded

    def with_sizes(self, sizes, lead: int = 0, trail: int = 0):
        raise PositionsNeeded

    def unfold(self, local, d: int):
        """This rank's rows (``local``, folded along dim ``d``) as ``(..., fold, base.local, ...)``: a view
        (splitting a dim in two is one whatever the strides)."""
        shape = list(local.shape)
        return local.view(shape[:d] + [self.fold, self.base.local] + shape[d + 1:])

    def local_sizes(self) -> tuple[int, ...]:
        """Every rank's number of rows (``fold`` times its part of each block)."""
        return tuple(self.fold * n for n in self.base.sizes)

    def held_by_one(self) -> bool:
        return False  # one rank holding every block's positions holds the whole dim: a ``Shard`` is made

    def same(self, other) -> bool:
        if isinstance(other, Strided):
            return other.fold == self.fold and self.base.same(other.base)
        if other.group is self.group and other.total == self.total:
            raise PositionsNeeded  # against a contiguous split of the same dim: as Shard.same(self) asks
        return False

    def __repr__(self) -> str:
        return f"Strided(fold={self.fold}, sizes={list(self.base.sizes)})"


def folded(base: Shard, fold: int) -> Shard | Strided:
    """The shard of a dim merged from ``fold`` outer positions and one sharded as ``base`` (see
    ``Strided``): a contiguous ``Shard`` where that is what it is (one block, or one rank holding all)."""
    if fold == 1:
        return base
    if base.held_by_one():
        return Shard(base.group, tuple(fold * n for n in base.sizes), base.rank)
    return Strided(base, fold)


@dataclass(frozen=True, eq=False)
class Merged:
    """Where a dim sharded over the span of two mesh dims came from: a reshape merged a block of dims
    of global ``shape``, the outermost (``shape[outer_at]``) sharded as ``outer`` and dim ``inner_at``
    as ``inner`` (tokens ``(t h w)`` of a t x h mesh). The span's rank at mesh coordinates (a, b) holds
    the b-th of ``inner.world`` even parts, in whole outer positions (frames), of what the a-th line
    of ``outer`` holds (``span_sizes``), so every rank computes on its own positions, and a later
    split of the dim back into frames stays on their grid; splitting it back into ``shape`` restores
    the two shards (one all-gather over the inner group)."""

    shape: tuple[int, ...]
    outer_at: int
    outer: Shard
    inner_at: int
    inner: Shard

    def unit(self) -> int:
        """Merged positions per outer position (a frame's tokens)."""
        return math.prod(self.shape[self.outer_at + 1:])

    def line_lengths(self) -> list[int]:
        """The merged positions each line of the outer group holds."""
        return [n * self.unit() for n in self.outer.sizes]

    def line_parts(self, line: int) -> tuple[int, ...]:
        """A line's merged positions split over the inner group, in whole outer positions."""
        return tuple(n * self.unit() for n in even_sizes(line // self.unit(), self.inner.world))

    def span_sizes(self) -> tuple[int, ...]:
        """Every span rank's length of the merged dim, outer-major."""
        return tuple(n for line in self.line_lengths() for n in self.line_parts(line))


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """``dims``: tensor dim -> ``Shard`` (sorted by dim); ``groups``: every group of the mesh this value
    lives on (a replicated value, ``dims`` empty, is the same on all of them); ``strategy``: the
    sequence-parallel strategy of attention over its tokens (``parallelize(strategy=)``; None: each
    form's default), carried by every value computed from it, so that a model's recomputation in
    backward chooses as its forward did whatever other model ran between them."""

    ndim: int
    dims: tuple[tuple[int, Shard], ...]
    groups: tuple[dist.ProcessGroup, ...]
    strategy: str | None = None

    @property
    def sharded(self) -> dict[int, Shard]:
        return dict(self.dims)

    @property
    def replicated(self) -> bool:
        return not self.dims

    @cached_property
    def strided(self) -> bool:
        """Whether a dim is sharded ``Strided`` (folded by a view)."""
        return any(isinstance(s, Strided) for _, s in self.dims)

    def global_shape(self, local_shape) -> tuple[int, ...]:
        shape = list(local_shape)
        for d, shard in self.dims:
            shape[d] = shard.total
        return tuple(shape)

    def local_shape(self, global_shape) -> tuple[int, ...]:
        shape = list(global_shape)
        for d, shard in self.dims:
            shape[d] = shard.local
        return tuple(shape)

    def split_alike(self, other: ShardSpec) -> bool:
        """Whether ``other`` describes a tensor of as many dims split alike: the same dims, each over
        the same group with the same sizes (``Shard.same``)."""
        if other.ndim != self.ndim or len(other.dims) != len(self.dims):
            return False
        return other.dims == self.dims or all(d == e and s.same(r) for (d, s), (e, r) in zip(self.dims, other.dims))

    def remap(self, ndim: int, dims: dict[int, Shard]) -> ShardSpec:
        """A spec on the same mesh for a tensor of ``ndim`` dims sharded as ``dims`` (this one where
        nothing changes: specs are immutable, and an op that keeps them runs at every layer)."""
        items = tuple(sorted(dims.items()))
        if ndim == self.ndim and items == self.dims:
            return self
        return ShardSpec(ndim, items, self.groups, self.strategy)

    def __repr__(self) -> str:
        return f"ShardSpec(ndim={self.ndim}, dims={dict(self.dims)})"
