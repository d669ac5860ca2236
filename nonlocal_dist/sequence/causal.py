"""Causal attention over a sharded sequence, load-balanced: the zigzag ring.

With contiguous shards, causal attention gives rank r the keys of ranks 0..r: the first rank works
on one block, the last on P. Here the sequence is cut into 2P chunks (``even_sizes``) and rank r
holds chunks r and 2P-1-r (``zigzag_chunks``), in that order. Then every ring step costs every rank
half a block:

- its own block: one causal kernel call over its positions (they are in global order, so the
  top-left causal mask of the local block is the global one);
- the block of an earlier rank o < r: all of its queries against o's first chunk (o's second chunk
  lies after both of its own);
- the block of a later rank o > r: its second chunk's queries against all of o's keys (its first
  chunk lies before both of o's).

No kernel call is masked but the diagonal one. Forward: key blocks travel around the ring while the
block in hand is computed (as ``ring.ring_forward``); outputs merge by log-sum-exp in float32.
Backward: each block travels with the gradient its keys have gathered so far and reaches its owner
after P steps; these transfers are not overlapped with the computation.

Schedules are written against a comm object, as in ``ring``: ``causal_ring_attention`` runs one rank
of a process group, ``local_causal_ring_attention`` every rank of a simulated ring in one process.
Placing the positions in zigzag order is the caller's (``zigzag_positions``; the sharded runtime's
attention rule fetches them and puts the output back).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.conventions import accumulation_dtype
from nonlocal_dist.distributed.comm import LocalComm, RingComm, local_comms
from nonlocal_dist.distributed.shards import even_sizes, starts
from nonlocal_dist.kernels import attention_backward, attention_forward
from nonlocal_dist.sequence.graph import refuse_graph_of_backward
from nonlocal_dist.sequence.merge import merge_partial
from nonlocal_dist.sequence.ring import (
    Schedule,
    _block_kernel,
    run_alone,
    run_in_lockstep,
)


def zigzag_chunks(total: int, world: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Rank r's two global position ranges ``[start, stop)``: chunks r and 2P-1-r of ``total``
    positions cut into 2P (``even_sizes``; empty chunks where total < 2P)."""
    sizes = even_sizes(total, 2 * world)
    bounds = [(a, a + n) for a, n in zip(starts(sizes), sizes)]
    return [(bounds[r], bounds[2 * world - 1 - r]) for r in range(world)]


def zigzag_positions(total: int, world: int) -> list[Tensor]:
    """Rank r's global positions in zigzag order (chunk r, then chunk 2P-1-r), as int64 tensors."""
    return [torch.cat([torch.arange(*first), torch.arange(*second)]) for first, second in zigzag_chunks(total, world)]


def zigzag_lengths(total: int, world: int) -> tuple[list[int], list[int]]:
    """Every rank's length of its first chunk, and of both chunks (its positions)."""
    chunks = zigzag_chunks(total, world)
    first = [a[1] - a[0] for a, _ in chunks]
    return first, [n + b[1] - b[0] for n, (_, b) in zip(first, chunks)]


def _shape(x: Tensor, positions: int) -> tuple[int, ...]:
    return (*x.shape[:-2], positions, x.shape[-1])


def _step_parts(rank: int, origin: int, first: list[int], n: int, m: int) -> tuple[slice, slice, bool] | None:
    """(query rows, key rows, causal) of this rank's work on ``origin``'s block of m keys; None: none."""
    if origin == rank:
        rows, keys, causal = slice(0, n), slice(0, m), True
    elif origin < rank:
        rows, keys, causal = slice(0, n), slice(0, first[origin]), False
    else:
        rows, keys, causal = slice(first[rank], n), slice(0, m), False
    if rows.stop - rows.start <= 0 or keys.stop - keys.start <= 0:
        return None
    return rows, keys, causal


def causal_ring_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, comm: RingComm | LocalComm,
                        total: int, kernel: str) -> Schedule:
    """One rank's forward schedule on its zigzag positions; returns out (B, H, N_r, dv) in q's dtype
    and the LSE (B, H, N_r) in the accumulation dtype. ``total``: the sequence's length."""
    first, lengths = zigzag_lengths(total, comm.world)
    n = q.shape[-2]
    acc = accumulation_dtype(q.dtype)
    out = q.new_zeros(_shape(v, n), dtype=acc)
    lse = q.new_full(q.shape[:-1], float("-inf"), dtype=acc)
    for step in range(comm.world):
        last = step == comm.world - 1
        origin = (comm.rank - step) % comm.world
        if not last:
            sender = (comm.rank - step - 1) % comm.world
            next_k = comm.send_recv(k, _shape(k, lengths[sender]))
            next_v = comm.send_recv(v, _shape(v, lengths[sender]))
            comm.commit()
        parts = _step_parts(comm.rank, origin, first, n, k.shape[-2])
        if parts is not None:
            rows, keys, causal = parts
            block_out, block_lse = attention_forward(
                q[..., rows, :], k[..., keys, :], v[..., keys, :], scale, kernel, causal=causal)
            if step == 0:  # the own block covers every query (each sees itself)
                out[..., rows, :], lse[..., rows] = block_out, block_lse
            else:
                _, merged = merge_partial(out[..., rows, :], lse[..., rows], block_out, block_lse)
                lse[..., rows] = merged
        if not last:
            yield
            comm.wait()
            k, v = next_k, next_v
    return out.to(q.dtype), lse


def causal_ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                         comm: RingComm | LocalComm, total: int, kernel: str) -> Schedule:
    """One rank's backward schedule; returns (dq, dk, dv) of its zigzag positions, dk/dv summed over
    every rank's queries: each block travels with its keys' gradient so far, home after P steps."""
    first, lengths = zigzag_lengths(total, comm.world)
    n = q.shape[-2]
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for step in range(comm.world):
        last = step == comm.world - 1
        origin = (comm.rank - step) % comm.world
        parts = _step_parts(comm.rank, origin, first, n, k.shape[-2])
        if parts is not None:
            rows, keys, causal = parts
            dq_b, dk_b, dv_b = attention_backward(
                dout[..., rows, :], q[..., rows, :], k[..., keys, :], v[..., keys, :], out[..., rows, :],
                lse[..., rows].contiguous(), scale, kernel, causal=causal)
            dq[..., rows, :] += dq_b
            dk[..., keys, :] += dk_b
            dv[..., keys, :] += dv_b
            del dq_b, dk_b, dv_b
        # The block (and its gradient so far) goes on; after the last step only the gradient, home.
        sender = (comm.rank - step - 1) % comm.world
        leaving = (dk, dv) if last else (k, v, dk, dv)
        arrived = [comm.send_recv(t, _shape(t, lengths[sender])) for t in leaving]
        comm.commit()
        del leaving
        yield
        comm.wait()
        if last:
            dk, dv = arrived
        else:
            k, v, dk, dv = arrived
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _CausalRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, total, kernel):
        out, lse = run_alone(causal_ring_forward(q, k, v, scale, RingComm(group), total, kernel))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group, ctx.total, ctx.kernel = scale, group, total, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_graph_of_backward("causal ring")
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = run_alone(causal_ring_backward(
            dout.contiguous(), q, k, v, out, lse, ctx.scale, RingComm(ctx.group), ctx.total, ctx.kernel))
        return dq, dk, dv, None, None, None, None


def causal_ring_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, group, total: int,
                          backend: str = "auto") -> Tensor:
    """Causal ``softmax_j<=i(scale q_i·k_j) v_j`` over a sequence of ``total`` positions held in zigzag
    order (``zigzag_positions``: this rank's q, k and v are the same positions); q (B, H, N_r, d),
    k (B, H, N_r, d), v (B, H, N_r, dv) -> (B, H, N_r, dv). ``backend``: as ``ring.ring_attention``."""
    return _CausalRing.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, group, total,
                             _block_kernel(q, k, v, scale, backend))


class _LocalCausalRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, world, kernel):
        total = q.shape[-2]
        places = zigzag_positions(total, world)
        qs, ks, vs = ([t.index_select(-2, p).contiguous() for p in places] for t in (q, k, v))
        schedules = [causal_ring_forward(*qkv, scale, comm, total, kernel)
                     for *qkv, comm in zip(qs, ks, vs, local_comms(world))]
        outs, lses = zip(*run_in_lockstep(schedules))
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses)
        ctx.scale, ctx.world, ctx.kernel, ctx.places = scale, world, kernel, places
        return _unzigzag(outs, places, total)

    @staticmethod
    def backward(ctx, dout):
        refuse_graph_of_backward("causal ring")
        w = ctx.world
        qs, ks, vs, outs, lses = (ctx.saved_tensors[i * w:(i + 1) * w] for i in range(5))
        total = dout.shape[-2]
        douts = [dout.index_select(-2, p).contiguous() for p in ctx.places]
        schedules = [causal_ring_backward(do, q, k, v, o, lse, ctx.scale, comm, total, ctx.kernel)
                     for do, q, k, v, o, lse, comm in zip(douts, qs, ks, vs, outs, lses, local_comms(w))]
        dqs, dks, dvs = zip(*run_in_lockstep(schedules))
        return (*(_unzigzag(parts, ctx.places, total) for parts in (dqs, dks, dvs)), None, None, None)


def _unzigzag(parts, places: list[Tensor], total: int) -> Tensor:
    whole = parts[0].new_empty(_shape(parts[0], total))
    for part, p in zip(parts, places):
        whole.index_copy_(-2, p, part)
    return whole


def local_causal_ring_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, world: int,
                                backend: str = "auto") -> Tensor:
    """The zigzag ring of ``world`` ranks simulated in one process: causal attention, differentiable.

    q, k (B, H, N, d), v (B, H, N, dv) -> (B, H, N, dv): positions placed in zigzag order, every
    simulated rank running the distributed schedule with its transfers handed over in memory.
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int (the number of simulated ranks), given {world!r}")
    if q.shape[-2] == 0 or k.shape[-2] != q.shape[-2] or v.shape[-2] != q.shape[-2]:
        raise ValueError(f"causal attention needs q, k and v over the same positions (N > 0); given N = "
                         f"{q.shape[-2]}, {k.shape[-2]}, {v.shape[-2]}")
    return _LocalCausalRing.apply(q, k, v, scale, world, _block_kernel(q, k, v, scale, backend))


__all__ = ["causal_ring_attention", "local_causal_ring_attention", "zigzag_chunks", "zigzag_lengths",
           "zigzag_positions"]
