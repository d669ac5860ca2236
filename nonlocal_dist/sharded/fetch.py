"""Fetch positions by global index along a sharded dim (differentiable, uneven and empty shards).

Rank r holds the global positions ``[a_r, a_r + L_r)`` of one dim of a tensor of length
``N = Σ L_r`` (contiguous, rank-ordered shards). ``fetch_positions(x, dim, needs, sizes, group)``
returns, on rank r, the positions ``needs[r]`` (global indices in ``[0, N)``, any order, repeats
allowed) of the global tensor along ``dim``: ``out.select(dim, j) == X.select(dim, needs[r][j])``.

Every rank passes the same ``needs`` (the list for EVERY rank, computed from shared metadata such
as a ``ShardSpec``), so each rank knows, without asking, which of its positions every other rank
reads. The transfer is one all-to-all: rank q sends rank r each position r needs from q once
(repeats are expanded on the receiving side), and a rank's own positions never travel. The
backward is the reverse all-to-all: the gradients of repeated positions are summed on the reader,
sent back, and added into their owners' gradients (``index_add``). Every rank of the group runs
exactly one all-to-all in the forward and one in the backward, a rank with nothing to send or
receive (an empty shard) too, so no rank is left waiting in a collective.

Used where an op's output position reads input positions of other ranks that no fixed halo
describes: ``F.pad`` with reflect/replicate/circular along a sharded dim (the edge ranks read
positions near the other end of the tensor) and ``F.interpolate`` (each output reads one or two
source positions of the global plan).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.distributed.comm import all_to_all_positions
from nonlocal_dist.distributed.shards import starts as shard_starts

__all__ = ["FetchPlan", "fetch_plan", "fetch_positions", "reshard"]


@dataclass(frozen=True)
class FetchPlan:
    """Who sends what, as seen from ``rank``.

    ``send[q]``: this rank's LOCAL indices (sorted, unique) that rank q reads (empty for q = rank).
    ``recv[q]``: how many distinct positions this rank receives from rank q (0 for q = rank).
    ``own``: this rank's local indices (sorted, unique) that it reads itself.
    ``order``: for each wanted position, its row in the table of distinct positions (the received
    pieces in rank order, ``own`` in this rank's slot), i.e. the table in global index order.
    """

    rank: int
    send: tuple[Tensor, ...]
    recv: tuple[int, ...]
    own: Tensor
    order: Tensor

    @property
    def counts(self) -> list[int]:
        """Rows of the table per owner rank (rank order)."""
        return [len(self.own) if q == self.rank else n for q, n in enumerate(self.recv)]

    @property
    def moves(self) -> bool:
        """Whether any position travels to or from this rank."""
        return any(self.recv) or any(len(s) for s in self.send)


def _owners(positions: Tensor, ends: Tensor) -> Tensor:
    """The rank owning each global position (the first rank whose shard ends after it)."""
    return torch.searchsorted(ends, positions, right=True)


def fetch_plan(sizes: Sequence[int], rank: int, needs: Sequence[Sequence[int] | Tensor]) -> FetchPlan:
    """The exchange for shard lengths ``sizes`` (rank order) where rank q reads ``needs[q]``."""
    sizes = [int(s) for s in sizes]
    if len(needs) != len(sizes):
        raise ValueError(f"needs must list the positions of each of the {len(sizes)} ranks, got {len(needs)} lists")
    total = sum(sizes)
    starts = shard_starts(sizes)
    ends = torch.tensor([s + n for s, n in zip(starts, sizes)], dtype=torch.int64)
    start = starts[rank]
    send = []
    for q, wanted in enumerate(needs):
        wanted = torch.as_tensor(wanted, dtype=torch.int64).reshape(-1)
        if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= total):
            raise ValueError(f"rank {q} needs positions outside [0, {total}): {wanted.tolist()}")
        if q == rank:
            distinct, order = torch.unique(wanted, sorted=True, return_inverse=True)
            owner = _owners(distinct, ends)
            recv = tuple(0 if p == rank else int((owner == p).sum()) for p in range(len(sizes)))
            own = distinct[owner == rank] - start
            send.append(torch.empty(0, dtype=torch.int64))
            continue
        distinct = torch.unique(wanted, sorted=True)
        send.append(distinct[_owners(distinct, ends) == rank] - start)
    return FetchPlan(rank, tuple(send), recv, own, order.reshape(-1))


class _Fetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, plan, group):
        moved = x.movedim(dim, 0)
        rest = moved.shape[1:]
        device = x.device
        chunks = [moved.index_select(0, idx.to(device)) for idx in plan.send]
        pieces = all_to_all_positions(chunks, list(plan.recv), rest, group)
        pieces[plan.rank] = moved.index_select(0, plan.own.to(device))
        table = torch.cat(pieces, 0)
        ctx.dim, ctx.plan, ctx.group, ctx.shape = dim, plan, group, moved.shape
        return table.index_select(0, plan.order.to(device)).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        plan, device = ctx.plan, grad.device
        moved = grad.movedim(ctx.dim, 0)
        rest = moved.shape[1:]
        table = moved.new_zeros((sum(plan.counts), *rest)).index_add_(0, plan.order.to(device), moved)
        pieces = list(table.split(plan.counts))
        own = pieces[plan.rank]
        pieces[plan.rank] = own.narrow(0, 0, 0)
        returned = all_to_all_positions(pieces, [len(s) for s in plan.send], rest, ctx.group)
        grad_x = moved.new_zeros(ctx.shape)
        grad_x.index_add_(0, plan.own.to(device), own)
        for idx, piece in zip(plan.send, returned):
            if len(idx):
                grad_x.index_add_(0, idx.to(device), piece)
        return grad_x.movedim(0, ctx.dim), None, None, None


def fetch_positions(
    x: Tensor,
    dim: int,
    needs: Sequence[Sequence[int] | Tensor],
    sizes: Sequence[int],
    group,
    rank: int | None = None,
) -> Tensor:
    """x (..., L_r, ...) sharded along ``dim`` -> (..., len(needs[r]), ...): the global positions
    ``needs[r]`` on rank r (see the module docstring).

    ``sizes[q]``: L_q on rank q; ``needs[q]``: the global positions rank q reads (the same list on
    every rank); ``rank``: this rank's index in ``group`` (default: ``dist.get_rank(group)``).
    Differentiable. Collective: every rank of ``group`` must call it with the same ``needs`` and
    ``sizes``; it runs one all-to-all (none in a group of one) even on a rank with nothing to move.
    A caller may skip the call altogether where no rank reads another's positions, a decision every
    rank makes alike from ``needs``.
    """
    dim = dim % x.dim()
    if rank is None:
        rank = dist.get_rank(group) if len(sizes) > 1 else 0
    plan = fetch_plan(sizes, rank, needs)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"x has {x.shape[dim]} positions along dim {dim}, but sizes[{rank}] = {sizes[rank]}")
    return _Fetch.apply(x, dim, plan, group)


def reshard(x: Tensor, dim: int, sizes: Sequence[int], to_sizes: Sequence[int], group, rank: int | None = None) -> Tensor:
    """x (..., sizes[r], ...) -> (..., to_sizes[r], ...): the same global tensor split by ``to_sizes``.

    Rank r ends with the global positions ``[s_r, s_r + to_sizes[r])`` (``s_r`` the sum of the
    lengths before it). Collective and differentiable, as ``fetch_positions`` (one all-to-all; a
    rank keeps the positions it already holds). Both splits must cover the same length.
    """
    if sum(sizes) != sum(to_sizes) or len(sizes) != len(to_sizes):
        raise ValueError(f"reshard keeps the global length and the group: {list(sizes)} -> {list(to_sizes)}")
    starts = shard_starts(to_sizes)
    needs = [torch.arange(s, s + n) for s, n in zip(starts, to_sizes)]
    return fetch_positions(x, dim, needs, sizes, group, rank)
