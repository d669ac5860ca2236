"""Ring strategy for the softmax modes: key blocks travel around the group, merged by log-sum-exp.

Forward: each step computes this rank's queries against the key block in hand while the next block
is already in flight (batch_isend_irecv). Backward: a second ring; every block's gradient uses the
*global* output and LSE, dq accumulates locally and dk/dv travel with their block back home.
Memory per rank: O((N + M)/P · d).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.kernels import attention_backward, attention_forward
from nonlocal_dist.parallel.comm import RingComm
from nonlocal_dist.parallel.merge import merge_partial


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


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, group, m_sizes: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for this rank's shards; dk/dv are summed over every rank's queries.

    Step s: the block of rank ``r - s`` is in hand; its gradient accumulated by the ranks it has
    visited arrives from the previous rank while this rank computes, this rank's part is added in
    place and the sum moves on with the block; after the last step it reaches the block's owner.
    """
    kv_comm, grad_comm = RingComm(group), RingComm(group)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = dk = dv = None
    for step in range(kv_comm.world):
        origin = (kv_comm.rank - step - 1) % kv_comm.world
        if step < kv_comm.world - 1:
            next_k = kv_comm.send_recv(k, _block_shape(k, m_sizes[origin]))
            next_v = kv_comm.send_recv(v, _block_shape(v, m_sizes[origin]))
            kv_comm.commit()
        dq_s, dk_s, dv_s = attention_backward(dout, q, k, v, out, lse, scale)
        dq = dq_s.to(acc) if dq is None else dq.add_(dq_s)
        del dq_s
        if step > 0:  # the block's gradient so far, from the ranks it visited before
            grad_comm.wait()
            dk_s, dv_s = dk.add_(dk_s), dv.add_(dv_s)
        dk = dv = None
        if kv_comm.world == 1:  # the only block is this rank's own
            dk, dv = dk_s, dv_s
            break
        dk = grad_comm.send_recv(dk_s.to(acc), _block_shape(dk_s, m_sizes[origin]))
        dv = grad_comm.send_recv(dv_s.to(acc), _block_shape(dv_s, m_sizes[origin]))
        grad_comm.commit()
        del dk_s, dv_s
        if step < kv_comm.world - 1:
            kv_comm.wait()
            k, v = next_k, next_v
    grad_comm.wait()
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
