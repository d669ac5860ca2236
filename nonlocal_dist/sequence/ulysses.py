"""Ulysses for the softmax modes: positions -> heads, the fused kernel with its log-sum-exp, heads ->
positions, in one autograd node.

q, k and v travel to head shards (``collectives.seq_to_heads``: in one all-to-all where they are
small, ``PACK_BYTES``, else one each with no packed copy); each rank runs the per-block kernel
(``backends.block_kernel_if_any``, as the ring does) on its H/P heads over all positions, and the
output goes back. The node saves the head shards of q, k and v, the log-sum-exp and its own output
(in position layout: the tensor the next layer keeps anyway), not the kernel's head-layout output.
The backward brings the output and its gradient to heads, runs the kernel's backward, and sends
dq, dk and dv home: two collectives each way where q, k and v are small (up to 4 and 5 otherwise),
and no second copy of the attention output per rank. As with torch's softmax, which also
keeps its output, modifying the output in place before the backward makes the backward raise
(autograd's version check), never compute a wrong gradient.

The kernel runs on each rank's whole head shard (ΣN queries, ΣM keys), unchunked, as the ring's
blocks do: on CUDA, B·H/P within the kernels' grid limit (``strategies.ulysses`` sends more to the
chunking dispatch).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.distributed.collectives import heads_to_seq, seq_to_heads
from nonlocal_dist.kernels import attention_backward, attention_forward
from nonlocal_dist.kernels.softmax import finite_kernel, in_layout_of
from nonlocal_dist.sequence.graph import refuse_graph_of_backward


class _UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, n_sizes, m_sizes, kernel):
        qh, kh, vh = seq_to_heads([q, k, v], [n_sizes, m_sizes, m_sizes], group)
        kernel = finite_kernel(kernel, qh, kh, vh)  # the backward reads only its gradient
        out, lse = attention_forward(qh, kh, vh, scale, kernel, checked=True)
        y = in_layout_of(heads_to_seq([out], [n_sizes], group)[0], q)
        ctx.save_for_backward(qh, kh, vh, lse, y)
        ctx.scale, ctx.group, ctx.sizes, ctx.kernel = scale, group, (n_sizes, m_sizes), kernel
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_graph_of_backward("Ulysses attention")
        qh, kh, vh, lse, y = ctx.saved_tensors
        n_sizes, m_sizes = ctx.sizes
        dout, out = seq_to_heads([dy, y], [n_sizes, n_sizes], ctx.group)
        dq, dk, dv = attention_backward(dout, qh, kh, vh, out, lse, ctx.scale, ctx.kernel, checked=True)
        del dout, out
        dq, dk, dv = heads_to_seq([dq.to(qh.dtype), dk.to(kh.dtype), dv.to(vh.dtype)], [n_sizes, m_sizes, m_sizes],
                                  ctx.group)
        return dq, dk, dv, None, None, None, None, None


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, group, n_sizes: list[int],
                      m_sizes: list[int], kernel: str) -> Tensor:
    """``softmax_j(scale q_i·k_j) v_j`` over every rank's keys, heads divisible by the group size.

    Shapes: q (B, H, N_r, d), k (B, H, M_r, d), v (B, H, M_r, dv) -> (B, H, N_r, dv); ``n_sizes[r]``,
    ``m_sizes[r]``: rank r's query and key positions (uneven and empty shards run). ``kernel``: one
    of ``kernels.softmax.LSE_KERNELS``. q, k and v go into the all-to-all's buffers as they are (any
    strides); the output is stored positions-first where q is (``kernels.softmax.in_layout_of``).
    """
    return _UlyssesAttention.apply(q, k, v, scale, group, list(n_sizes), list(m_sizes), kernel)
