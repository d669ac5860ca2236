"""Halo exchange along one axis of a tensor sharded over a process group (differentiable, uneven shards).

Rank r holds the global positions ``[a_r, a_r + L_r)`` of an axis of length ``N = Σ L_r``. A
sliding-window layer on rank r needs ``before`` positions to the left of its shard and ``after`` to
the right; ``halo_exchange`` fetches them in one all-to-all. A shard shorter than the halo is no
special case: every rank sends whatever part of its shard falls in another rank's window, so a wide
halo is assembled from several ranks. Positions outside ``[0, N)`` do not exist; the layer's own
padding (``fill``) stands for them at the global edges.

The exchange returns the extended axis (fill, halos, shard, halos, fill) in one tensor, so the
layer runs once on it. The backward is the reverse all-to-all: each halo's gradient goes back to
the rank that owns those positions and is added to that rank's input gradient. Every rank runs
exactly one all-to-all in the forward and one in the backward, the edge ranks too (with empty
messages where they have nothing to send), so the group never waits on a
rank that skipped a collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.distributed.checks import agree_across_ranks
from nonlocal_dist.distributed.comm import all_to_all_positions
from nonlocal_dist.distributed.shards import starts as shard_starts


@dataclass(frozen=True)
class HaloPlan:
    """Who sends what: ``send[q]`` = (offset, length) of this rank's positions that rank q receives;
    ``recv[q]`` = the number of positions this rank receives from rank q (0 for itself)."""

    rank: int
    send: tuple[tuple[int, int], ...]
    recv: tuple[int, ...]

    @property
    def before(self) -> int:
        """Positions received from lower ranks (they precede the shard)."""
        return sum(self.recv[: self.rank])

    @property
    def after(self) -> int:
        """Positions received from higher ranks (they follow the shard)."""
        return sum(self.recv[self.rank + 1 :])


def _window(starts: list[int], sizes: list[int], rank: int, before: int, after: int) -> tuple[int, int]:
    """Global positions [lo, hi) that ``rank`` holds after the exchange, clipped to the axis."""
    total = starts[-1] + sizes[-1]
    return max(0, starts[rank] - before), min(total, starts[rank] + sizes[rank] + after)


def halo_plan(sizes: list[int], rank: int, before: int, after: int) -> HaloPlan:
    """The exchange for shard lengths ``sizes`` (rank order), as seen from ``rank``."""
    if before < 0 or after < 0:
        raise ValueError(f"halo widths must be >= 0, got before={before}, after={after}")
    starts = shard_starts(sizes)
    own = (starts[rank], starts[rank] + sizes[rank])
    send, recv = [], []
    for q in range(len(sizes)):
        if q == rank:
            send.append((0, 0))
            recv.append(0)
            continue
        lo, hi = _window(starts, sizes, q, before, after)
        s_lo, s_hi = max(lo, own[0]), min(hi, own[1])
        send.append((s_lo - own[0], s_hi - s_lo) if s_hi > s_lo else (0, 0))
        lo, hi = _window(starts, sizes, rank, before, after)
        r_lo, r_hi = max(lo, starts[q]), min(hi, starts[q] + sizes[q])
        recv.append(max(0, r_hi - r_lo))
    return HaloPlan(rank, tuple(send), tuple(recv))


def shard_lengths(x: Tensor, dim: int, group, what: str, ndim: int | None = None) -> list[int]:
    """Every rank's length of x along ``dim`` (one small all-gather).

    Raises the same error on every rank when any rank's x does not have ``ndim`` dims, or when the
    other dims or the dtype differ between ranks (``what`` names the caller in the message).
    """

    def validate():
        if ndim is not None and x.dim() != ndim:
            raise ValueError(
                f"{what} expects a batched (B, C, {ndim - 2} spatial dims) input sharded along dim {dim}, "
                f"got shape {tuple(x.shape)}; add the batch dim"
            )
        others = tuple(-1 if d == dim else n for d, n in enumerate(x.shape))
        return None, {"shape (shard dim as -1)": others, "dtype": x.dtype, "shard_length": x.shape[dim]}

    names = ("shape (shard dim as -1)", "dtype", "shard_length")
    _, values = agree_across_ranks(group, validate, names, what=what, free=("shard_length",))
    return values["shard_length"]


def _positions_first(x: Tensor, dim: int, offset: int, length: int) -> Tensor:
    return x.narrow(dim, offset, length).movedim(dim, 0).contiguous()


def halo_exchange(
    x: Tensor,
    dim: int,
    before: int,
    after: int,
    sizes: list[int],
    group,
    fill: tuple[int, int] = (0, 0),
    value: float = 0.0,
) -> Tensor:
    """x (..., L_r, ...) sharded along ``dim`` -> (..., fill[0] + h_b + L_r + h_a + fill[1], ...).

    ``h_b = min(before, a_r)`` positions of the lower ranks and ``h_a = min(after, N - a_r - L_r)``
    of the higher ranks, in global order (a shard shorter than the halo is spanned: the positions come
    from as many ranks as needed); ``fill`` adds that many positions of ``value`` at the two ends
    (the layer's padding at the global edges). ``sizes[r]`` is L_r on rank r (``shard_lengths``).
    Differentiable: the halos' gradients are sent back and added to their owners' gradients; x's
    gradient is a view of the extended tensor's where no halo left this rank (one copy otherwise).
    Collective: every rank of ``group`` must call it with the same ``before``/``after`` (none is
    run when both are 0 or the group has one rank: the result is x with its fill, x itself if none).
    """
    if (before == 0 and after == 0) or len(sizes) == 1:  # no rank reads another's positions: no exchange
        if not any(fill):
            return x
        return torch.cat([edge_fill(x, dim, fill[0], value), x, edge_fill(x, dim, fill[1], value)], dim)
    plan = halo_plan(sizes, dist.get_rank(group), before, after)
    return _HaloExchange.apply(x, dim, plan, group, fill, value)


def edge_fill(x: Tensor, dim: int, length: int, value: float) -> Tensor:
    """``length`` positions of ``value`` shaped like x along ``dim`` (the padding at a global edge)."""
    shape = list(x.shape)
    shape[dim] = length
    return x.new_full(shape, value)


def constant_pad(x: Tensor, pad, value: float = 0.0) -> Tensor:
    """``F.pad(x, pad, value=value)`` in constant mode (negative pads crop), also where x has an empty
    dim (an empty shard), which torch 2.8's ``constant_pad_nd`` refuses when that dim's pads are zero
    and another dim's are not."""
    if x.numel():
        return F.pad(x, pad, value=value)
    for i in range(len(pad) // 2):
        d, left, right = x.dim() - 1 - i, int(pad[2 * i]), int(pad[2 * i + 1])
        start, stop = max(-left, 0), x.shape[d] - max(-right, 0)
        if stop < start:
            raise RuntimeError(f"F.pad: pads ({left}, {right}) crop more than dim {d}'s {x.shape[d]} positions")
        x = x.narrow(d, start, stop - start)
        x = torch.cat([edge_fill(x, d, max(left, 0), value), x, edge_fill(x, d, max(right, 0), value)], d)
    return x


def _extend(x: Tensor, dim: int, plan: HaloPlan, group, fill: tuple[int, int], value: float) -> Tensor:
    """x (this rank's positions) -> (fill, halo before, x, halo after, fill): one all-to-all."""
    rest = x.movedim(dim, 0).shape[1:]
    chunks = [_positions_first(x, dim, off, n) for off, n in plan.send]
    received = all_to_all_positions(chunks, list(plan.recv), rest, group)
    # Received in rank order: the lower ranks' positions precede the shard, the higher ranks' follow it.
    halo_before = torch.cat(received[: plan.rank]).movedim(0, dim) if plan.before else edge_fill(x, dim, 0, value)
    halo_after = torch.cat(received[plan.rank + 1 :]).movedim(0, dim) if plan.after else edge_fill(x, dim, 0, value)
    parts = [edge_fill(x, dim, fill[0], value), halo_before, x, halo_after, edge_fill(x, dim, fill[1], value)]
    return torch.cat(parts, dim)


def _fold(ext: Tensor, dim: int, plan: HaloPlan, group, fill: tuple[int, int], length: int) -> Tensor:
    """The adjoint of ``_extend``: ext (fill, halo before, shard, halo after, fill) -> the shard's
    ``length`` positions plus every halo position sent back to (and added on) the rank owning it;
    the fill positions are dropped. One all-to-all. A view of ext where nothing came back (one copy
    otherwise)."""
    rest = ext.movedim(dim, 0).shape[1:]
    start = fill[0] + plan.before  # the shard's first position in the extended axis
    back, offset = [], fill[0]
    for q, n in enumerate(plan.recv):
        if q == plan.rank:
            offset = start + length
        back.append(_positions_first(ext, dim, offset, n))
        offset += n
    returned = all_to_all_positions(back, [n for _, n in plan.send], rest, group)
    out = ext.narrow(dim, start, length)
    if any(n for _, n in plan.send):
        out = out.clone()
        for (off, n), piece in zip(plan.send, returned):
            if n:
                out.narrow(dim, off, n).add_(piece.movedim(0, dim))
    return out


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, plan, group, fill, value):
        ctx.dim, ctx.plan, ctx.group, ctx.fill = dim, plan, group, fill
        ctx.length = x.shape[dim]
        return _extend(x, dim, plan, group, fill, value)

    @staticmethod
    def backward(ctx, grad):
        return _fold(grad, ctx.dim, ctx.plan, ctx.group, ctx.fill, ctx.length), None, None, None, None, None


def halo_reduce(
    ext: Tensor,
    dim: int,
    before: int,
    after: int,
    sizes: list[int],
    group,
    fill: tuple[int, int] = (0, 0),
) -> Tensor:
    """The adjoint of ``halo_exchange`` (an overlap-add): ext (..., fill[0] + h_b + L_r + h_a + fill[1], ...)
    -> (..., L_r, ...).

    ``ext`` is laid out as ``halo_exchange`` returns it on this rank (same ``before``, ``after``,
    ``sizes``, ``fill``): values for the global positions ``[a_r - h_b, a_r + L_r + h_a)`` of an axis
    of which rank r owns ``[a_r, a_r + L_r)``. Each halo position is sent to the rank owning it and
    added there to that rank's own values; the fill positions are dropped. Rank r returns its
    ``L_r`` positions, summed over every rank whose window covers them (several ranks when a shard
    is shorter than the halo). Used by a transposed convolution, whose local outputs spill over
    onto the following ranks' positions. Differentiable: the backward is ``halo_exchange`` of the
    gradient (zero fill). Collective: every rank of ``group`` must call it with the same
    ``before``/``after``.
    """
    rank = dist.get_rank(group)
    plan = halo_plan(sizes, rank, before, after)
    expected = fill[0] + plan.before + sizes[rank] + plan.after + fill[1]
    if ext.shape[dim] != expected:
        raise ValueError(
            f"halo_reduce: rank {rank} expects {expected} positions along dim {dim} (fill {fill[0]} + halo "
            f"{plan.before} + own {sizes[rank]} + halo {plan.after} + fill {fill[1]}), got {ext.shape[dim]}"
        )
    return _HaloReduce.apply(ext, dim, plan, group, fill, sizes[rank])


class _HaloReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, dim, plan, group, fill, length):
        ctx.dim, ctx.plan, ctx.group, ctx.fill = dim, plan, group, fill
        out = _fold(ext, dim, plan, group, fill, length)
        # A custom Function's output that is a view of its input could not be modified in place later.
        return out if any(n for _, n in plan.send) else out.clone()

    @staticmethod
    def backward(ctx, grad):
        return _extend(grad, ctx.dim, ctx.plan, ctx.group, ctx.fill, 0.0), None, None, None, None, None
