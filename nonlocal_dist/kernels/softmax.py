"""Softmax affinities (gaussian, embedded gaussian): the single-device paths and the per-block kernels.

Single device (``sdpa_attention``, ``blocked_attention``): no log-sum-exp is needed, so the public
``F.scaled_dot_product_attention`` runs, and torch picks its kernel (CPU flash; CUDA cuDNN, flash or
memory-efficient) and its backward. The query-blocked path (``blocked_softmax``) takes non-finite
CPU inputs, ``torch.func`` transforms and graphs of the backward (``create_graph=True``).

Per-block kernels (``attention_forward``/``attention_backward``, named by ``LSE_KERNELS``): a key
block's output *and* its log-sum-exp, and a backward that takes a *global* output and LSE, so that a
key block's gradients are exact when the output was merged from several blocks (the sequence-parallel
ring). torch exposes these only as private ops (``FUSED_OPS``), each tried once per process
(``working``); ``nonlocal_dist.backends`` chooses the kernel, ``blocked`` where a private op failed.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.conventions import all_finite
from nonlocal_dist.kernels.blocked_softmax import (
    blocked_backward,
    blocked_forward,
    blocked_jvp,
)

# Widest head for the fused kernels. CUDA: no fused backward past 256 (torch falls back to a path
# 4-8x slower than the blocked one, issue 10, H200). CPU: the blocked path was 1.7-3x faster than
# the CPU flash kernel at d = 320-1024, fwd+bwd, N = M = 1024-4096, float32, 2 threads (d = 512,
# N = 2048: 1.92 s vs 0.65 s); at d = 32 the flash kernel was 2x faster.
FUSED_MAX_HEAD = 256
# Positions per kernel call in the ring backward on CPU: bounds the per-call buffers (issue 3).
CPU_BACKWARD_CHUNK = 512
# The private ops (forward, backward) behind each fused per-block kernel, looked up at call time.
FUSED_OPS = {
    "cpu_flash": (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "efficient": ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"),
}
LSE_KERNELS = (*FUSED_OPS, "blocked")


def preferred_chunk(device: torch.device | str) -> int | None:
    """Positions per kernel call for a chunked backward on ``device``; None: the whole block.

    CPU: 512, so the kernel's buffers stay small. CUDA: whole blocks: one flash backward over a
    32768² block took 1.5 ms where 512-position chunks took 265 ms (H200, issue 10).
    """
    return None if torch.device(device).type == "cuda" else CPU_BACKWARD_CHUNK


def nonfinite_on_cpu(*tensors: Tensor) -> bool:
    """The one rule for non-finite inputs: True when they must take the blocked path.

    torch's CPU kernels (the public call and the private op alike) give zeros for a NaN query row
    when there are fewer than 16 keys, and NaN for an inf value. Checked on CPU only (on CUDA the
    check is a host sync, and the CUDA kernels follow the formula), never while torch.compile traces
    (a data-dependent branch breaks the graph).
    """
    return tensors[0].device.type == "cpu" and not torch.compiler.is_compiling() and not all_finite(*tensors)


def fused_head_size(q: Tensor, v: Tensor) -> int:
    """One head size for q (.., d), k and v (.., dv): max(d, dv), a multiple of 8 on CUDA.

    Zero-padding to it leaves both q·k and the weighted sum of v unchanged.
    """
    e = max(q.shape[-1], v.shape[-1])
    return -(-e // 8) * 8 if q.is_cuda else e


# Per-block kernels that read any strides with a unit last stride, on CPU: a model's positions-first
# q, k and v ((b n h d) transposed to (b h n d)) go in without a copy. torch's CPU flash kernel indexes
# every operand by its own strides (on torch 2.13 its output also follows q's layout, and its dq is
# positions-first); the blocked kernel's plain torch ops take any strides. On CUDA every kernel gets
# contiguous inputs, as before (no GPU has run strided ones here).
STRIDED_KERNELS = ("cpu_flash", "blocked")


def kernel_input(x: Tensor, kernel: str) -> Tensor:
    """``x`` as ``kernel`` reads it: as it is for ``STRIDED_KERNELS`` on CPU (given a unit last
    stride), else contiguous."""
    if kernel in STRIDED_KERNELS and x.device.type == "cpu" and x.stride(-1) == 1:
        return x
    return x.contiguous()


def positions_first(x: Tensor) -> bool:
    """Whether ``x`` (B, H, N, d) is stored positions-first: each position's heads side by side, d after
    d, the positions further apart. That is the layout a model's ``(b n (h d)) -> (b n h d) -> (b h n d)``
    view leaves, and also one slice of a fused projection, ``(b n (3 h d))`` split into q, k and v (its
    positions 3·h·d apart). Its heads and positions neither one nor empty."""
    if x.dim() != 4 or x.shape[1] < 2 or x.shape[2] < 2 or x.stride(3) != 1:
        return False
    return x.stride(1) == x.shape[3] and x.stride(2) >= x.shape[1] * x.shape[3]


def in_layout_of(out: Tensor, q: Tensor) -> Tensor:
    """``out`` (B, H, N, dv) stored positions-first where ``q`` is (one copy, only where ``out`` is
    not already): the model's transpose and flatten of the attention output are then views, and the
    tensor an attention node saves is the one the next layer saves (one copy per step, not two). The
    copy is a tensor of its own (``empty_strided``), not a view: an autograd node may return it."""
    if positions_first(q) and not positions_first(out):
        b, h, n, dv = out.shape
        return torch.empty_strided(out.shape, (n * h * dv, dv, h * dv, 1), dtype=out.dtype,
                                   device=out.device).copy_(out)
    return out


def _pad_last(x: Tensor, size: int, kernel: str = "") -> Tensor:
    return kernel_input(x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1])), kernel)


def _op(name: str):
    # Looked up per call: a build without the op raises AttributeError where the caller expects it.
    return getattr(torch.ops.aten, name)


def fused_forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float,
                  causal: bool = False) -> tuple[Tensor, Tensor]:
    """One private op's forward on inputs of one head size e: out (B, H, N, e), lse (B, H, N).
    ``causal``: query i sees keys 0..i (N = M only: the kernels disagree on the alignment otherwise)."""
    op = _op(FUSED_OPS[kernel][0])
    if kernel == "cpu_flash":
        return op(q, k, v, 0.0, causal, attn_mask=None, scale=scale)
    if kernel == "flash":
        return op(q, k, v, 0.0, causal, False, scale=scale)[:2]
    out, lse = op(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.shape[-2]]  # the efficient kernel pads the LSE to its tile


def fused_backward(
    kernel: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
    causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One private op's backward on inputs of one head size: (dq, dk, dv)."""
    op = _op(FUSED_OPS[kernel][1])
    if kernel == "cpu_flash":
        return op(dout, q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale)
    # Dense calls: no cumulative sequence lengths; no dropout, so the philox seed and offset are never read.
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    if kernel == "flash":
        return op(dout, q, k, v, out, lse, None, None, q.shape[-2], k.shape[-2], 0.0, causal, seed, seed, scale=scale)
    return op(dout, q, k, v, None, out, lse, seed, seed, 0.0, [True, True, True, False], causal, scale=scale)[:3]


# (kernel, device type, dtype) -> whether its private ops ran when first tried in this process.
_WORKING: dict[tuple[str, str, torch.dtype], bool] = {}


def working(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the private ops of a fused per-block ``kernel`` run on this torch build, for ``device``
    and ``dtype``: tried once per process on a tiny input (a forward and a backward). An op that
    raises (a changed signature, a build without it) gets one warning naming it and the torch
    version, and the callers fall back to the ``blocked`` kernel."""
    key = (kernel, device.type, dtype)
    if key not in _WORKING:
        _WORKING[key] = _try_once(kernel, device, dtype)
    return _WORKING[key]


def _try_once(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    forward_op, backward_op = FUSED_OPS[kernel]
    x = torch.linspace(-1, 1, 64, device=device).reshape(1, 1, 8, 8).to(dtype)
    op = forward_op
    try:
        out, lse = fused_forward(kernel, x, x, x, 1.0)
        op = backward_op
        fused_backward(kernel, x, x, x, x, out, lse, 1.0)
    except (TypeError, RuntimeError, AttributeError) as exc:
        warnings.warn(
            f"torch.ops.aten.{op} failed on torch {torch.__version__} ({type(exc).__name__}: {exc}); the "
            f"per-block softmax kernel {kernel!r} falls back to 'blocked' (exact, slower) for {dtype} on "
            f"{device.type} for the rest of this process", RuntimeWarning, stacklevel=4)
        return False
    return True


def finite_kernel(kernel: str, q: Tensor, k: Tensor, v: Tensor) -> str:
    """``kernel``, or ``blocked`` where q, k and v are not all finite on CPU (``nonfinite_on_cpu``):
    what ``attention_forward`` runs. A node that keeps q, k and v for its backward decides once and
    passes ``checked=True`` to both calls, so its backward reads only the incoming gradient."""
    return "blocked" if kernel == "blocked" or nonfinite_on_cpu(q, k, v) else kernel


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: str,
                      causal: bool = False, checked: bool = False) -> tuple[Tensor, Tensor]:
    """``out = softmax(scale q k^T) v`` and ``lse = log Σ_j exp(scale q·k_j)`` through ``kernel``.

    Shapes: q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> out (B, H, N, dv) in v's dtype,
    lse (B, H, N) (float32 for half inputs). ``kernel``: one of ``LSE_KERNELS``, as chosen by
    ``backends.select_block_kernel``; non-finite CPU inputs run ``blocked`` (``nonfinite_on_cpu``).
    ``causal`` (N = M, the same positions): query i sees keys 0..i only. ``checked``: ``kernel`` is
    ``finite_kernel``'s for these q, k and v (they are not read again).
    """
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"a causal block needs as many queries as keys (the same positions); given N = "
                         f"{q.shape[-2]}, M = {k.shape[-2]}")
    if kernel == "blocked" or (not checked and nonfinite_on_cpu(q, k, v)):
        return blocked_forward(q, k, v, scale, causal=causal)
    e = fused_head_size(q, v)
    out, lse = fused_forward(kernel, *(_pad_last(t, e, kernel) for t in (q, k, v)), scale, causal)
    return out[..., : v.shape[-1]], lse


def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, kernel: str,
    causal: bool = False, checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``softmax(scale q k^T) v`` for this key block through ``kernel``.

    ``out`` and ``lse`` (B, H, N, dv) / (B, H, N) may be those of the full key set: then dq is this
    block's contribution to the full dq and dk, dv are exact for this block. ``causal``, ``checked``:
    as ``attention_forward`` (checked: only ``dout`` is read for non-finite values).
    """
    if kernel == "blocked" or nonfinite_on_cpu(dout, *(() if checked else (q, k, v))):
        return blocked_backward(dout, q, k, v, out, lse, scale, causal=causal)
    e = fused_head_size(q, v)
    padded = (_pad_last(t, e, kernel) for t in (dout, q, k, v, out))
    dq, dk, dv = fused_backward(kernel, *padded, lse.contiguous(), scale, causal)
    return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dv[..., : v.shape[-1]]


def _transformed(*tensors: Tensor) -> bool:
    """Whether a ``torch.func`` transform wraps any of these (never while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def differentiable_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``softmax(scale q k^T) v`` as plain torch ops on q, k and v (a graph of the
    backward: every term recomputed from them, so second derivatives include the paths through the
    output and the LSE)."""
    out, lse = blocked_forward(q, k, v, scale)
    return blocked_backward(dout, q, k, v, out, lse, scale)


class _BlockedAttention(torch.autograd.Function):
    """The blocked forward and backward; differentiable recomputation where a graph of the backward
    is asked for (``create_graph=True``, ``torch.func`` transforms); a batching rule (``vmap``)."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        return blocked_forward(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled() or _transformed(dout, q, k, v):
            dq, dk, dv = differentiable_backward(dout, q, k, v, ctx.scale)
        else:
            dq, dk, dv = blocked_backward(dout.contiguous(), q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    @staticmethod
    def vmap(info, in_dims, q: Tensor, k: Tensor, v: Tensor, scale: float):
        return _fold_vmap(_BlockedAttention, info, in_dims, q, k, v, scale)


def _fold_vmap(function, info, in_dims, q: Tensor, k: Tensor, v: Tensor, scale: float):
    # Batch entries are independent: the vmapped axis folds into the batch axis B.
    def fold(t: Tensor, dim: int | None) -> Tensor:
        t = t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
        return t.reshape(-1, *t.shape[2:]).contiguous()

    q, k, v = (fold(t, dim) for t, dim in zip((q, k, v), in_dims[:3]))
    out, lse = function.apply(q, k, v, scale)
    return (out.unflatten(0, (info.batch_size, -1)), lse.unflatten(0, (info.batch_size, -1))), (0, 0)


class _BlockedAttentionForwardMode(_BlockedAttention):
    """The same with a forward-mode rule (``torch.func.jacfwd``, ``hessian``), used under ``torch.func``
    transforms only: torch.compile cannot trace a Function that defines ``jvp``."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _BlockedAttention.setup_context(ctx, inputs, output)
        q, k, v, _ = inputs
        ctx.save_for_forward(q, k, v, output[1])

    @staticmethod
    def jvp(ctx, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None, _scale):
        q, k, v, lse = ctx.saved_tensors
        return blocked_jvp(q, k, v, lse, ctx.scale, tq, tk, tv), None

    @staticmethod
    def vmap(info, in_dims, q: Tensor, k: Tensor, v: Tensor, scale: float):
        return _fold_vmap(_BlockedAttentionForwardMode, info, in_dims, q, k, v, scale)


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax_j(scale q_i·k_j) v_j`` in query blocks, O(N·d) memory, any head width.

    Shapes: q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> (B, H, N, dv). Double backward and
    ``torch.func`` transforms (grad, jacrev, jacfwd, vmap) work.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    function = _BlockedAttentionForwardMode if _transformed(q, k, v) else _BlockedAttention
    return function.apply(q, k, v, scale)[0]


class _BackwardGraph(torch.autograd.Function):
    """Passes the public call's output through: its backward is torch's (the gradient goes on to the
    public call's own node, in the same backward pass), except where a graph of the backward is asked
    for (``create_graph=True``): torch's backward has no derivative, so the blocked path, plain torch
    ops, gives q, k, v their gradients and the public call's node gets none."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, out: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout: Tensor):
        if torch.is_grad_enabled():
            q, k, v = ctx.saved_tensors
            return (*differentiable_backward(dout, q, k, v, ctx.scale), None, None)
        return None, None, None, dout, None


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax_j(scale q_i·k_j) v_j`` through the public ``F.scaled_dot_product_attention``.

    Shapes: q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> (B, H, N, dv); d, dv <= 256
    (``FUSED_MAX_HEAD``). Heads of different widths are zero-padded to one (torch's fused kernels
    take one head size; it would otherwise materialise the (N, M) affinity). Non-finite CPU inputs
    and ``torch.func`` transforms run ``blocked_attention``; double backward works.
    """
    if _transformed(q, k, v) or nonfinite_on_cpu(q, k, v):
        return blocked_attention(q, k, v, scale)
    dv = v.shape[-1]
    e = max(q.shape[-1], dv)
    # On CPU torch runs its flash kernel: it needs a unit stride in the last dim (else it materialises
    # the affinity) and reads any other strides, so positions-first inputs go in without a copy (on
    # torch 2.13 its output then comes back positions-first too). CUDA gets contiguous inputs.
    q, k, v = (_pad_last(t, e, "cpu_flash") for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if out.requires_grad and not torch.compiler.is_compiling():
        out = _BackwardGraph.apply(q, k, v, out, scale)
    return out[..., :dv]


__all__ = [
    "FUSED_MAX_HEAD", "FUSED_OPS", "LSE_KERNELS", "STRIDED_KERNELS", "attention_backward", "attention_forward",
    "differentiable_backward", "finite_kernel",
    "blocked_attention", "fused_backward", "fused_forward", "fused_head_size", "in_layout_of", "kernel_input",
    "nonfinite_on_cpu", "positions_first", "preferred_chunk", "sdpa_attention", "working",
]
