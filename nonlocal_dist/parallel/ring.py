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


def ring_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, group, m_sizes: list[int]) -> tuple[Tensor, Tensor]:
    """Output (B, H, N_r, dv) in q's dtype and the global LSE (B, H, N_r) for local queries."""
    comm = RingComm(group)
    d = k.shape[-1]
    kv = torch.cat([k, v], dim=-1)
    out = lse = None
    for step in range(comm.world):
        if step < comm.world - 1:
            origin = (comm.rank - step - 1) % comm.world
            incoming = comm.send_recv(kv, (*kv.shape[:2], m_sizes[origin], kv.shape[-1]))
            comm.commit()
        block_out, block_lse = attention_forward(q, kv[..., :d], kv[..., d:], scale)
        out, lse = merge_partial(out, lse, block_out, block_lse)
        if step < comm.world - 1:
            comm.wait()
            kv = incoming
    return out.to(q.dtype), lse


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, group, m_sizes: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for this rank's shards; dk/dv are summed over every rank's queries."""
    kv_comm, grad_comm = RingComm(group), RingComm(group)
    d = k.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv = torch.cat([k, v], dim=-1)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = None
    for step in range(kv_comm.world):
        origin = (kv_comm.rank - step - 1) % kv_comm.world
        if step < kv_comm.world - 1:
            incoming = kv_comm.send_recv(kv, (*kv.shape[:2], m_sizes[origin], kv.shape[-1]))
            kv_comm.commit()
        dq_s, dk_s, dv_s = attention_backward(dout, q, kv[..., :d], kv[..., d:], out, lse, scale)
        dq += dq_s
        block_grad = torch.cat([dk_s, dv_s], dim=-1).to(acc)
        if kv_comm.world == 1:  # the only block is this rank's own
            dkv = block_grad
            break
        if dkv is not None:
            grad_comm.wait()
            block_grad = block_grad + dkv
        # The accumulated gradient of the block in hand moves on with it; after the last step it
        # reaches the block's owner.
        dkv = grad_comm.send_recv(block_grad, (*kv.shape[:2], m_sizes[origin], kv.shape[-1]))
        grad_comm.commit()
        if step < kv_comm.world - 1:
            kv_comm.wait()
            kv = incoming
    grad_comm.wait()
    return dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype)


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
