"""Softmax affinities (gaussian, embedded gaussian) through the fastest exact kernel of the device.

``attention_forward`` returns the output and its log-sum-exp (float32 for half inputs);
``attention_backward`` takes a *global* output and LSE, so that a key block's backward is exact
even when the output was merged from several key blocks (the sequence-parallel ring relies on it).

Kernels (``kernel_for``): CUDA half precision with head width <= 256: torch's flash attention op
(it returns the LSE; 0.61 / 1.52 ms forward / backward on a 32768² block, d = 64, H200, against
2.24 / 8.16 ms for the memory-efficient op, issue 10); other CUDA inputs up to 256: the
memory-efficient op; CPU: torch's flash kernel for CPU; wider heads, float64 on CUDA and
non-finite CPU inputs: the query-blocked path of ``blocked_softmax`` (the fused CPU kernel gives
zeros for a NaN query row when there are fewer than 16 keys, and NaN for an inf value).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.conventions import HALF_DTYPES, all_finite
from nonlocal_dist.kernels.blocked_softmax import blocked_backward, blocked_forward, blocked_jvp

# Widest head for the fused kernels. CUDA: no fused backward past 256 (torch falls back to a path
# 4-8x slower than the blocked one, issue 10, H200). CPU: the blocked path was 1.7-3x faster than
# the CPU flash kernel at d = 320-1024, fwd+bwd, N = M = 1024-4096, float32, 2 threads (d = 512,
# N = 2048: 1.92 s vs 0.65 s); at d = 32 the flash kernel was 2x faster.
FUSED_MAX_HEAD = 256
# Positions per kernel call in the ring backward on CPU: bounds the per-call buffers (issue 3).
CPU_BACKWARD_CHUNK = 512


def preferred_chunk(device: torch.device | str) -> int | None:
    """Positions per kernel call for a chunked backward on ``device``; None: the whole block.

    CPU: 512, so the kernel's buffers stay small. CUDA: whole blocks: one flash backward over a
    32768² block took 1.5 ms where 512-position chunks took 265 ms (H200, issue 10).
    """
    return None if torch.device(device).type == "cuda" else CPU_BACKWARD_CHUNK


def _pad_last(x: Tensor, size: int) -> Tensor:
    return x.contiguous() if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _fused_head_size(q: Tensor, v: Tensor) -> int:
    # The fused kernels need one head size for q, k and v, a multiple of 8 on CUDA; zero-padding
    # leaves both q·k and the weighted sum of v unchanged.
    e = max(q.shape[-1], v.shape[-1])
    return -(-e // 8) * 8 if q.is_cuda else e


def _flash_ok(q: Tensor, head: int) -> bool:
    if q.dtype not in HALF_DTYPES or not torch.backends.cuda.is_flash_attention_available():
        return False
    capability = torch.cuda.get_device_capability(q.device)
    # sm86/sm89 have no flash backward past head size 192 (torch's own SDPA checks the same).
    return capability >= (8, 0) and not (capability in ((8, 6), (8, 9)) and head > 192)


def kernel_for(q: Tensor, v: Tensor) -> str:
    """``flash``, ``efficient``, ``cpu_flash`` or ``blocked``: the kernel for q (.., d), v (.., dv)."""
    head = max(q.shape[-1], v.shape[-1])
    if head > FUSED_MAX_HEAD:
        return "blocked"
    if q.is_cuda:
        if q.dtype == torch.float64:
            return "blocked"
        return "flash" if _flash_ok(q, _fused_head_size(q, v)) else "efficient"
    return "cpu_flash"


def _use_blocked(kernel: str, *tensors: Tensor) -> bool:
    # The finiteness check is a host sync on CUDA: only the CPU kernel, whose quirk it avoids, pays
    # it; a graph traced by torch.compile keeps the fused kernel (a data-dependent branch breaks it).
    if kernel == "blocked":
        return True
    return kernel == "cpu_flash" and not torch.compiler.is_compiling() and not all_finite(*tensors)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``out = softmax(scale q k^T) v`` and ``lse = log Σ_j exp(scale q·k_j)``.

    Shapes: q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> out (B, H, N, dv), lse (B, H, N).
    """
    kernel = kernel_for(q, v)
    if _use_blocked(kernel, q, k, v):
        return blocked_forward(q, k, v, scale)
    e = _fused_head_size(q, v)
    qp, kp, vp = _pad_last(q, e), _pad_last(k, e), _pad_last(v, e)
    if kernel == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kp, vp, 0.0, False, attn_mask=None, scale=scale
        )
    elif kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qp, kp, vp, 0.0, False, False, scale=scale)[:2]
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
    kernel = kernel_for(q, v)
    if _use_blocked(kernel, dout, q, k, v):
        return blocked_backward(dout, q, k, v, out, lse, scale)
    e = _fused_head_size(q, v)
    qp, kp, vp = _pad_last(q, e), _pad_last(k, e), _pad_last(v, e)
    doutp, outp, lse = _pad_last(dout, e), _pad_last(out, e), lse.contiguous()
    if kernel == "cpu_flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doutp, qp, kp, vp, outp, lse, 0.0, False, attn_mask=None, scale=scale
        )
    elif kernel == "flash":
        # Dense (not variable-length) calls: no cumulative sequence lengths; no dropout, so the
        # philox seed and offset are never read.
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            doutp, qp, kp, vp, outp, lse, None, None, q.shape[-2], k.shape[-2], 0.0, False, seed, seed, scale=scale
        )
    else:
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            doutp, qp, kp, vp, None, outp, lse, seed, seed, 0.0, [True, True, True, False], False, scale=scale
        )
    return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dv[..., : v.shape[-1]]


def _transformed(*tensors: Tensor) -> bool:
    """Whether a ``torch.func`` transform wraps any of these (never while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _SoftmaxAttention(torch.autograd.Function):
    """Fused (or blocked) forward and backward; differentiable recomputation where a graph of the
    backward is asked for (``create_graph=True``, ``torch.func`` transforms); a forward-mode rule
    (``jvp``) and a batching rule (``vmap``)."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, blocked: bool) -> tuple[Tensor, Tensor]:
        return blocked_forward(q, k, v, scale) if blocked else attention_forward(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, scale, blocked = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.blocked = scale, blocked
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled() or _transformed(dout, q, k, v):
            # A graph of the backward itself: every term recomputed from q, k, v by plain torch ops,
            # so second derivatives include the paths through the output and the LSE.
            out, lse = blocked_forward(q, k, v, ctx.scale)
            dq, dk, dv = blocked_backward(dout, q, k, v, out, lse, ctx.scale)
        elif ctx.blocked:
            dq, dk, dv = blocked_backward(dout.contiguous(), q, k, v, out, lse, ctx.scale)
        else:
            dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None, None

    @staticmethod
    def vmap(info, in_dims, q: Tensor, k: Tensor, v: Tensor, scale: float, blocked: bool):
        return _fold_vmap(_SoftmaxAttention, info, in_dims, q, k, v, scale, blocked)


def _fold_vmap(function, info, in_dims, q: Tensor, k: Tensor, v: Tensor, scale: float, blocked: bool):
    # Batch entries are independent: the vmapped axis folds into the batch axis B.
    def fold(t: Tensor, dim: int | None) -> Tensor:
        t = t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
        return t.reshape(-1, *t.shape[2:]).contiguous()

    q, k, v = (fold(t, dim) for t, dim in zip((q, k, v), in_dims[:3]))
    out, lse = function.apply(q, k, v, scale, blocked)
    return (out.unflatten(0, (info.batch_size, -1)), lse.unflatten(0, (info.batch_size, -1))), (0, 0)


class _SoftmaxAttentionForwardMode(_SoftmaxAttention):
    """The same with a forward-mode rule (``torch.func.jacfwd``, ``hessian``), used under ``torch.func``
    transforms only: torch.compile cannot trace a Function that defines ``jvp``."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _SoftmaxAttention.setup_context(ctx, inputs, output)
        q, k, v, _, _ = inputs
        ctx.save_for_forward(q, k, v, output[1])

    @staticmethod
    def jvp(ctx, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None, _scale, _blocked):
        q, k, v, lse = ctx.saved_tensors
        return blocked_jvp(q, k, v, lse, ctx.scale, tq, tk, tv), None

    @staticmethod
    def vmap(info, in_dims, q: Tensor, k: Tensor, v: Tensor, scale: float, blocked: bool):
        return _fold_vmap(_SoftmaxAttentionForwardMode, info, in_dims, q, k, v, scale, blocked)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, *, blocked: bool = False) -> Tensor:
    """``softmax_j(scale q_i·k_j) v_j`` in O(N·d) memory; shapes as ``attention_forward``.

    ``blocked``: the query-blocked path whatever the head width (``backend="blocked"``).
    Double backward and ``torch.func`` transforms (grad, jacrev, vmap) work through either path.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    function = _SoftmaxAttentionForwardMode if _transformed(q, k, v) else _SoftmaxAttention
    return function.apply(q, k, v, scale, blocked)[0]
