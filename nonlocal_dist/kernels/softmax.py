"""Softmax affinities (gaussian, embedded gaussian) through fused attention kernels.

``attention_forward`` returns the output and its log-sum-exp (float32 for fp32/bf16 inputs);
``attention_backward`` takes a *global* output and LSE, so that a key block's backward is exact
even when the output was merged from several key blocks (the sequence-parallel ring relies on it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _pad_last(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _common_head_size(q: Tensor, v: Tensor) -> int:
    # The fused kernels need one head size for q, k and v; zero-padding the smaller side
    # leaves both q·k and the weighted sum of v unchanged.
    return max(q.shape[-1], v.shape[-1])


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``out = softmax(scale q k^T) v`` and ``lse = log Σ_j exp(scale q·k_j)``.

    Shapes: q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> out (B, H, N, dv), lse (B, H, N).
    """
    e = _common_head_size(q, v)
    qp, kp, vp = _pad_last(q, e), _pad_last(k, e), _pad_last(v, e)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kp, vp, 0.0, False, attn_mask=None, scale=scale
        )
    else:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            qp, kp, vp, None, True, 0.0, False, scale=scale
        )
        lse = lse[..., : q.shape[-2]]
    return out[..., : v.shape[-1]], lse


def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``softmax(scale q k^T) v`` for this key block.

    ``out`` and ``lse`` (B, H, N, dv) / (B, H, N) may be those of the full key set: then dq is this
    block's contribution to the full dq and dk, dv are exact for this block.
    """
    e = _common_head_size(q, v)
    qp, kp, vp = _pad_last(q, e), _pad_last(k, e), _pad_last(v, e)
    doutp, outp = _pad_last(dout.contiguous(), e), _pad_last(out.contiguous(), e)
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doutp, qp, kp, vp, outp, lse, 0.0, False, attn_mask=None, scale=scale
        )
    else:
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            doutp, qp, kp, vp, None, outp, lse.contiguous(), seed, seed, 0.0, [True, True, True, False],
            False, scale=scale,
        )
    return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dv[..., : v.shape[-1]]


class _SoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax_j(scale q_i·k_j) v_j`` in O(N·d) memory; shapes as ``attention_forward``.

    On CUDA this is torch's own ``scaled_dot_product_attention`` (it picks flash or
    memory-efficient kernels); on CPU the LSE-returning flash kernel above.
    """
    if q.device.type == "cuda":
        e = _common_head_size(q, v)
        out = F.scaled_dot_product_attention(_pad_last(q, e), _pad_last(k, e), _pad_last(v, e), scale=scale)
        return out[..., : v.shape[-1]]
    return _SoftmaxAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale)
