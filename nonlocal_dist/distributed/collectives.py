"""Differentiable collectives over the position axis: one autograd node per call.

A call that moves several tensors (phi and g; theta, phi and g) is one autograd node whose forward
and backward run its collectives in a fixed order: the order of collectives is then the same on
every rank (two sibling nodes in one graph have been seen to pair the wrong gradients on gloo).
Large gathered tensors each travel as they are (no packed copy); small ones, where a collective
costs its latency rather than its bytes, travel packed in one (``PACK_BYTES``); so do the
all-to-alls of Ulysses (``seq_to_heads``/``heads_to_seq``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.distributed.comm import (
    Started,
    all_reduce_sum,
    all_to_all_parts,
    all_to_all_varlen,
    reduce_scatter_parts,
    start_all_gather_varlen,
)

# Parts of one shape whose gathered sizes together take at most this many bytes are packed into one
# all-gather: the two non-local blocks of the main job's I3D then gather keys and values with 2
# collectives instead of 4, and one back (``comm.reduce_scatter_parts``).
PACK_BYTES = 2**20


def _packable(parts: tuple[Tensor, ...], sizes: list[int]) -> bool:
    """Whether ``parts`` (B, H, L_r, c) travel packed: more than one, of one shape, dtype and device,
    small in all. Decided from what every rank shares (the global sizes, every dim but the position one)."""
    if len(parts) < 2:
        return False
    first = parts[0]
    if any(p.dtype != first.dtype or p.device != first.device or p.shape != first.shape for p in parts):
        return False
    per_position = math.prod(first.shape[:-2]) * first.shape[-1] * first.element_size() * len(parts)
    return per_position * sum(sizes) <= PACK_BYTES


def gather_parts(parts: tuple[Tensor, ...], sizes: list[int], group) -> tuple[Tensor, ...]:
    """``parts`` (B, H, L_r, c_k) whole along positions on every rank (not differentiable). Packed
    parts are stacked on a new leading dim: each comes out of the gather as one contiguous slice of
    it, with no copy beyond the collective's own."""
    return start_gather_parts(parts, sizes, group).wait()


def start_gather_parts(parts: tuple[Tensor, ...], sizes: list[int], group) -> Started:
    """``gather_parts`` started (``comm.Started``: its ``wait()`` gives the whole parts), so the caller
    computes while they travel; packed alike, one collective per part otherwise."""
    if not _packable(parts, sizes):
        started = [start_all_gather_varlen(p, sizes, dim=-2, group=group) for p in parts]
        return Started(None, lambda: tuple(s.wait() for s in started))
    whole = start_all_gather_varlen(torch.stack(parts), sizes, dim=-2, group=group)
    return Started(None, lambda: whole.wait().unbind(0))


def scatter_sum_parts(grads: tuple[Tensor, ...], sizes: list[int], group) -> tuple[Tensor, ...]:
    """The adjoint of ``gather_parts``: each of ``grads`` (B, H, Σ L, c_k) summed over the ranks, this
    rank's positions kept (not differentiable); packed as ``gather_parts`` packed the parts."""
    if not _packable(grads, sizes):  # the parts' decision: the same dims but the positions, the same dtype
        return tuple(reduce_scatter_parts([g], sizes, -2, group)[0] for g in grads)  # one at a time: one buffer each
    return tuple(reduce_scatter_parts(list(grads), sizes, -2, group))


class _GatherPositions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, sizes, *parts):
        ctx.group, ctx.sizes = group, sizes
        return gather_parts(parts, sizes, group)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *scatter_sum(ctx.group, ctx.sizes, *grads))


class _ScatterSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, sizes, *grads):
        ctx.group, ctx.sizes = group, sizes
        return scatter_sum_parts(grads, sizes, group)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *gather_positions(ctx.group, ctx.sizes, *grads))


def scatter_sum(group, sizes: list[int], *grads: Tensor) -> tuple[Tensor, ...]:
    """``scatter_sum_parts``, differentiable where a graph is being recorded (the backward of a gather
    under ``create_graph=True``: its own backward gathers again, so second derivatives keep the terms
    through the other ranks' positions); the plain collective otherwise."""
    if torch.is_grad_enabled() and any(g.requires_grad for g in grads):
        return _ScatterSum.apply(group, sizes, *grads)
    return scatter_sum_parts(grads, sizes, group)


def gather_positions(group, sizes: list[int], *parts: Tensor) -> tuple[Tensor, ...]:
    """All-gather tensors (B, H, L_r, c_k) along positions, one node; backward reduce-scatters.

    ``sizes[r]`` is L on rank r. Returns the full (B, H, Σ L, c_k) tensors in rank order.
    """
    return _GatherPositions.apply(group, sizes, *parts)


def gather_dims(parts: list[Tensor], dim: int, sizes: list[int], group) -> list[Tensor]:
    """Each of ``parts`` whole along ``dim`` on every rank: one differentiable all-gather node for them
    all (packed into one collective where they are small and of one shape, as keys and values are),
    pieces of length ``sizes[r]`` (any number of dims, empty pieces too); the backward reduce-scatters."""
    flats, shapes = [], []
    for local in parts:
        moved = local.movedim(dim, 0)
        shapes.append(list(moved.shape[1:]))
        flats.append(moved.reshape(1, moved.shape[0], math.prod(shapes[-1])))
    gathered = gather_positions(group, sizes, *flats)
    return [g.reshape(sum(sizes), *rest).movedim(0, dim) for g, rest in zip(gathered, shapes)]


def gather_dim(local: Tensor, dim: int, sizes: list[int], group) -> Tensor:
    """The whole of ``dim`` on every rank: a differentiable all-gather of the pieces of length
    ``sizes[r]`` (any number of dims, empty pieces too); the backward reduce-scatters."""
    return gather_dims([local], dim, sizes, group)[0]


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group), None


def all_reduce(x: Tensor, group) -> Tensor:
    """Differentiable sum over ranks (each rank's gradient is the sum of every rank's gradient)."""
    return _AllReduce.apply(x, group)


def _small(parts: list[Tensor], sizes: list[list[int]], scale: int = 1) -> bool:
    """Whether ``parts`` (.., L, c) travel in one all-to-all: their whole tensors together at most
    ``PACK_BYTES`` (a head shard's bytes times ``scale``, the group size), counted from what every
    rank shares (every dim but the position one, and the global position counts).
    Larger ones go one by one: a part whose slices are adjacent is then sent as it is, and one whose
    pieces arrive adjacent is the receive buffer itself (packed, both are copies)."""
    return scale * sum(math.prod(p.shape[:-2]) * p.shape[-1] * p.element_size() * sum(s)
                       for p, s in zip(parts, sizes)) <= PACK_BYTES


def _each_or_packed(parts: list[Tensor], send_dim: int, send_sizes: list[list[int]], recv_dim: int,
                    recv_sizes: list[list[int]], positions: list[list[int]], group, scale: int = 1) -> list[Tensor]:
    if _small(parts, positions, scale):
        return all_to_all_parts(parts, send_dim, send_sizes, recv_dim, recv_sizes, group)
    return [all_to_all_parts([p], send_dim, [s], recv_dim, [r], group)[0]
            for p, s, r in zip(parts, send_sizes, recv_sizes)]


def seq_to_heads(parts: list[Tensor], sizes: list[list[int]], group) -> list[Tensor]:
    """(B, H, L_r, c_i) position shards -> (B, H/P, Σ L, c_i) head shards (in one all-to-all where
    they are small, ``_small``); ``sizes[i]``: part i's positions on each rank."""
    world = dist.get_world_size(group)
    return _each_or_packed(parts, 1, [[p.shape[1] // world] * world for p in parts], 2, sizes, sizes, group)


def heads_to_seq(parts: list[Tensor], sizes: list[list[int]], group) -> list[Tensor]:
    """(B, H/P, Σ L, c_i) head shards -> (B, H, L_r, c_i) position shards (the inverse all-to-all)."""
    world = dist.get_world_size(group)
    heads = [[p.shape[1]] * world for p in parts]
    return _each_or_packed(parts, 2, sizes, 1, heads, sizes, group, scale=world)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, sizes, *parts):
        ctx.group, ctx.sizes = group, sizes
        return tuple(seq_to_heads(list(parts), sizes, group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *heads_to_seq(list(grads), ctx.sizes, ctx.group))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return heads_to_seq([x], [sizes], group)[0]

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads([grad], [ctx.sizes], ctx.group)[0], None, None


def scatter_heads(group, sizes: list[list[int]], *parts: Tensor) -> tuple[Tensor, ...]:
    """Differentiable ``seq_to_heads`` of several tensors in one node (one collective each way where
    they are small); ``sizes[i]``: positions per rank of part i."""
    return _SeqToHeads.apply(group, sizes, *parts)


def gather_heads(x: Tensor, group, sizes: list[int]) -> Tensor:
    """Differentiable ``heads_to_seq``."""
    return _HeadsToSeq.apply(x, group, sizes)


class _MoveShard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, from_dim, from_sizes, to_dim, to_sizes, group):
        ctx.args = (from_dim, from_sizes, to_dim, to_sizes, group)
        return all_to_all_varlen(x, to_dim, to_sizes, from_dim, from_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        from_dim, from_sizes, to_dim, to_sizes, group = ctx.args
        return all_to_all_varlen(grad.contiguous(), from_dim, from_sizes, to_dim, to_sizes, group), None, None, None, None, None


def move_shard(x: Tensor, from_dim: int, from_sizes: list[int], to_dim: int, to_sizes: list[int], group) -> Tensor:
    """x sharded along ``from_dim`` (``from_sizes[r]`` on rank r, ``to_dim`` whole) -> the same tensor
    sharded along ``to_dim`` by ``to_sizes`` (``from_dim`` whole): one all-to-all, differentiable (the
    backward is the reverse all-to-all)."""
    return _MoveShard.apply(x, from_dim, list(from_sizes), to_dim, list(to_sizes), group)
