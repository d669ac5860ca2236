"""Differentiable collectives over the position axis, each one autograd node with one collective.

Packing several tensors into one message keeps every backward to a single collective per node, so
the order of collectives is the same on every rank (two sibling collectives in one graph have
been seen to pair the wrong gradients on gloo).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.parallel.comm import all_gather_varlen, all_reduce_sum, reduce_scatter_varlen


class _GatherPositions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, sizes, *parts):
        widths = [p.shape[-1] for p in parts]
        packed = torch.cat([p.to(parts[0].dtype) for p in parts], dim=-1)
        full = all_gather_varlen(packed, sizes, dim=-2, group=group)
        ctx.group, ctx.sizes, ctx.widths = group, sizes, widths
        return tuple(t.contiguous() for t in full.split(widths, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        packed = torch.cat(grads, dim=-1)
        local = reduce_scatter_varlen(packed, ctx.sizes, dim=-2, group=ctx.group)
        return (None, None, *local.split(ctx.widths, dim=-1))


def gather_positions(group, sizes: list[int], *parts: Tensor) -> tuple[Tensor, ...]:
    """All-gather tensors (B, H, L_r, c_k) along positions in one collective; backward reduce-scatters.

    ``sizes[r]`` is L on rank r. Returns the full (B, H, Σ L, c_k) tensors in rank order.
    """
    return _GatherPositions.apply(group, sizes, *parts)


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


def _a2a(send_chunks: list[Tensor], recv_shapes: list[tuple[int, ...]], group) -> list[Tensor]:
    send = torch.cat([c.reshape(-1) for c in send_chunks])
    recv_sizes = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, recv_sizes, [c.numel() for c in send_chunks], group=group)
    return [r.view(s) for r, s in zip(recv.split(recv_sizes), recv_shapes)]


def seq_to_heads(x: Tensor, sizes: list[int], group) -> Tensor:
    """(B, H, L_r, c) position shards -> (B, H/P, Σ L, c) head shards (all-to-all)."""
    world = dist.get_world_size(group)
    b, h, _, c = x.shape
    hp = h // world
    chunks = [x[:, p * hp : (p + 1) * hp].contiguous() for p in range(world)]
    pieces = _a2a(chunks, [(b, hp, sizes[s], c) for s in range(world)], group)
    return torch.cat(pieces, dim=2)


def heads_to_seq(x: Tensor, sizes: list[int], group) -> Tensor:
    """(B, H/P, Σ L, c) head shards -> (B, H, L_r, c) position shards (the inverse all-to-all)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    b, hp, _, c = x.shape
    chunks = [t.contiguous() for t in x.split(sizes, dim=2)]
    pieces = _a2a(chunks, [(b, hp, sizes[rank], c) for _ in range(world)], group)
    return torch.cat(pieces, dim=1)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, sizes, *parts):
        widths = [p.shape[-1] for p in parts]
        ctx.group, ctx.sizes, ctx.widths = group, sizes, widths
        full = seq_to_heads(torch.cat(parts, dim=-1), sizes, group)
        return tuple(t.contiguous() for t in full.split(widths, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        local = heads_to_seq(torch.cat(grads, dim=-1), ctx.sizes, ctx.group)
        return (None, None, *local.split(ctx.widths, dim=-1))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return heads_to_seq(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad.contiguous(), ctx.sizes, ctx.group), None, None


def scatter_heads(group, sizes: list[int], *parts: Tensor) -> tuple[Tensor, ...]:
    """Differentiable ``seq_to_heads`` of tensors sharing position sizes, in one all-to-all."""
    return _SeqToHeads.apply(group, sizes, *parts)


def gather_heads(x: Tensor, group, sizes: list[int]) -> Tensor:
    """Differentiable ``heads_to_seq``."""
    return _HeadsToSeq.apply(x, group, sizes)
