"""Ring strategy for the softmax modes: key blocks travel around the group, merged by log-sum-exp.

Forward: each step computes this rank's queries against the key block in hand while the next block
is already in flight (batch_isend_irecv); partial outputs merge in place. Backward: a second ring;
every block's gradient uses the *global* output and LSE, dq accumulates locally and dk/dv travel
with their block back home, chunk by chunk. Memory per rank: O((N + M)/P · d); at N = M the
backward holds about seven (N/P)·d tensors (out, dout, dq, and the block's k, v, dk, dv).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.kernels import attention_backward, attention_forward
from nonlocal_dist.parallel.comm import RingComm
from nonlocal_dist.parallel.merge import merge_partial
from nonlocal_dist.conventions import accumulation_dtype


BACKWARD_CHUNK = 512  # positions per kernel call in the ring backward (queries and keys)


def _block_shape(x: Tensor, positions: int) -> tuple[int, ...]:
    return (*x.shape[:2], positions, x.shape[-1])


def ring_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, group, m_sizes: list[int]) -> tuple[Tensor, Tensor]:
    """Output (B, H, N_r, dv) in q's dtype and the global LSE (B, H, N_r) for local queries.

    k and v travel as they are (two messages per step, no packed copy): the rank holds the block in
    hand and the one arriving, 2 (M/P)(d + dv) values.
    """
    comm = RingComm(group)
    out = lse = None
    for step in range(comm.world):
        if step < comm.world - 1:
            origin = (comm.rank - step - 1) % comm.world
            next_k = comm.send_recv(k, _block_shape(k, m_sizes[origin]))
            next_v = comm.send_recv(v, _block_shape(v, m_sizes[origin]))
            comm.commit()
        block_out, block_lse = attention_forward(q, k, v, scale)
        out, lse = merge_partial(out, lse, block_out, block_lse)
        del block_out, block_lse
        if step < comm.world - 1:
            comm.wait()
            k, v = next_k, next_v
    return out.to(q.dtype), lse


def _pieces(length: int, count: int) -> list[int]:
    """``count`` near-equal sizes summing to ``length`` (the larger ones first)."""
    base, extra = divmod(length, count)
    return [base + (i < extra) for i in range(count)]


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, group, m_sizes: list[int],
    chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for this rank's shards; dk/dv are summed over every rank's queries.

    Step s: the block of rank ``r - s`` is in hand, cut into the same number of position chunks on
    every rank, each with the gradient its keys have gathered so far. Kernel calls take one query
    chunk and one key chunk, so their outputs are chunk-sized and are added in place. As soon as a
    key chunk is done it leaves for the next rank (keys, values and their gradient so far) while the
    same chunk of the next block arrives and the following chunk is computed: transfers overlap
    computation, and the rank holds one block (k, v, dk, dv) plus one chunk in flight. After the
    last step only the gradients travel, to the block's owner. ``chunk``: positions per kernel call
    (default ``BACKWARD_CHUNK``).
    """
    comm = RingComm(group)
    if comm.world == 1:
        return attention_backward(dout, q, k, v, out, lse, scale)
    chunk = chunk or BACKWARD_CHUNK
    acc = accumulation_dtype(q.dtype)
    count = max(1, min(min(m_sizes), -(-max(m_sizes) // chunk)))  # key chunks per block, same on every rank
    q_sizes = _pieces(q.shape[-2], -(-q.shape[-2] // chunk))
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    queries = list(zip(dout.split(q_sizes, -2), q.split(q_sizes, -2), out.split(q_sizes, -2),
                       lse.split(q_sizes, -1), dq.split(q_sizes, -2)))
    own = _pieces(m_sizes[comm.rank], count)
    block = [[kc, vc, None, None] for kc, vc in zip(k.split(own, -2), v.split(own, -2))]
    for step in range(comm.world):
        last = step == comm.world - 1
        incoming = _pieces(m_sizes[(comm.rank - step - 1) % comm.world], count)
        arrived = []
        for j in range(count):
            kc, vc, dkc, dvc = block[j]
            block[j] = None  # the chunk lives on only in the transfer below
            for dout_i, q_i, out_i, lse_i, dq_i in queries:
                dq_ij, dk_ij, dv_ij = attention_backward(dout_i, q_i, kc, vc, out_i, lse_i.contiguous(), scale)
                dq_i.add_(dq_ij)
                if dkc is None:
                    dkc, dvc = dk_ij.to(acc), dv_ij.to(acc)
                else:
                    dkc.add_(dk_ij)
                    dvc.add_(dv_ij)
                del dq_ij, dk_ij, dv_ij
            comm.wait()  # the previous chunk's transfer: its buffers go
            leaving = (dkc, dvc) if last else (kc, vc, dkc, dvc)
            arrived.append([comm.send_recv(t, _block_shape(t, incoming[j])) for t in leaving])
            comm.commit()
            del kc, vc, dkc, dvc, leaving
        comm.wait()
        block = arrived
    dk = torch.cat([c[0] for c in block], -2)
    dv = torch.cat([c[1] for c in block], -2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, m_sizes):
        out, lse = ring_forward(q, k, v, scale, group, m_sizes)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group, ctx.m_sizes = scale, group, m_sizes
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.scale, ctx.group, ctx.m_sizes)
        return dq, dk, dv, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, group, m_sizes: list[int]) -> Tensor:
    """``softmax_j(scale q_i·k_j) v_j`` over the keys of every rank; q (B, H, N_r, d) -> (B, H, N_r, dv).

    ``m_sizes[r]`` is the number of key positions held by rank r of ``group``.
    """
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, group, m_sizes)
