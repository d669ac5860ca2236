"""Softmax attention in query blocks, the affinity materialised one block at a time.

The exact path for head widths the fused kernels cannot take (d or dv > 256: torch's CUDA kernels
have no fused backward there and fall back to a path 4-8x slower, issue 10), and the differentiable
path behind double backward, ``torch.func`` transforms and non-finite inputs: plain torch ops only,
so autograd and vmap see through them.

Precision: scores, softmax and every sum run in the accumulation dtype (float32 for half inputs:
an fp16 logit past 65504 cannot overflow); the two products with half operands keep their
tensor-core matmuls and only their outputs are float32, as the fused kernels do.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from nonlocal_dist.conventions import HALF_DTYPES, accumulation_dtype

# Bytes held per score (one query against one key) while a block is in flight: the float32 scores
# or probabilities, the backward's float32 dp and ds, and their half copies for the matmuls.
_BYTES_PER_SCORE = 16
# CPU: one block's scores stay within a budget that keeps them near the caches; a larger budget
# was no faster on 2 cores (scripts/benchmark.py, wide-head rows).
CPU_BLOCK_BUDGET = 64 * 2**20
# CUDA: a quarter of the memory free at the call, so that autograd's other tensors still fit.
CUDA_FREE_FRACTION = 0.25
_ROUND = 64  # query block sizes in multiples of a GPU tile


def query_block_size(q: Tensor, k: Tensor) -> int:
    """Query positions per block for q (B, H, N, d) against k (B, H, M, d): the memory budget of
    ``q``'s device divided by the bytes one query row of scores holds (at least one row)."""
    if q.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(q.device)
        budget = int(free * CUDA_FREE_FRACTION)
    else:
        budget = CPU_BLOCK_BUDGET
    row_bytes = q.shape[0] * q.shape[1] * k.shape[-2] * _BYTES_PER_SCORE
    rows = max(1, budget // max(row_bytes, 1))
    if rows >= q.shape[-2]:
        return q.shape[-2]
    return max(rows // _ROUND * _ROUND, min(rows, _ROUND))


@lru_cache(maxsize=None)
def _float32_out_bmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs for ``dtype`` operands on ``device``
    (torch >= 2.8 on CUDA); asked once per device and dtype with a 1x1 product."""
    try:
        one = torch.ones(1, 1, 1, device=device, dtype=dtype)
        return torch.bmm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def matmul_acc(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for (..., n, k) @ (..., k, m) with the output in the accumulation dtype.

    Half CUDA operands use the tensor-core matmul with a float32 output (``bmm(out_dtype=)``);
    elsewhere the operands are cast to the accumulation dtype first.
    """
    acc = accumulation_dtype(a.dtype)
    # Under torch.autocast a float32 matmul would run (and return) in the autocast dtype.
    with torch.autocast(a.device.type, enabled=False):
        if a.dtype in HALF_DTYPES and a.is_cuda and _float32_out_bmm(a.device, a.dtype):
            lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            a3 = a.expand(*lead, *a.shape[-2:]).flatten(0, -3) if lead else a.unsqueeze(0)
            b3 = b.expand(*lead, *b.shape[-2:]).flatten(0, -3) if lead else b.unsqueeze(0)
            out = torch.bmm(a3, b3, out_dtype=acc)
            return out.unflatten(0, lead) if lead else out.squeeze(0)
        return a.to(acc) @ b.to(acc)


def _tracked(*tensors: Tensor) -> bool:
    """Whether autograd or a ``torch.func`` transform sees these ops: then no in-place updates."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if not torch.compiler.is_compiling() and any(wrapped(t) for t in tensors):
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def future_keys(start: int, rows: int, keys: int, device) -> Tensor:
    """The causal mask of query rows ``start .. start + rows`` against ``keys`` keys: True where key
    j > query i (top-left aligned: query i sees keys 0..i), (rows, keys) bool."""
    i = torch.arange(start, start + rows, device=device)
    return torch.arange(keys, device=device)[None, :] > i[:, None]


def blocked_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, block: int | None = None,
                    causal: bool = False) -> tuple[Tensor, Tensor]:
    """``out = softmax(scale q k^T) v`` and ``lse = log Σ_j exp(scale q·k_j)``, one query block at a time.

    Shapes: q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> out (B, H, N, dv) in v's dtype,
    lse (B, H, N) in the accumulation dtype. ``block``: queries per block (default from memory).
    ``causal``: query i sees keys 0..i only (``future_keys``; N <= M, each row keeps a key).
    """
    block = block or query_block_size(q, k)
    in_place = not _tracked(q, k, v)
    k_t = k.transpose(-1, -2)
    outs, lses = [], []
    for start in range(0, q.shape[-2], block):
        q_b = q[..., start:start + block, :]
        s = matmul_acc(q_b, k_t)
        s = s.mul_(scale) if in_place else s * scale
        if causal:
            mask = future_keys(start, q_b.shape[-2], k.shape[-2], q.device)
            s = s.masked_fill_(mask, float("-inf")) if in_place else s.masked_fill(mask, float("-inf"))
        # One fused softmax pass; the LSE from the largest probability, p_max >= 1/M, so
        # lse = s_max - log p_max loses nothing (a separate logsumexp would read the scores twice more).
        s_max, at = s.max(dim=-1, keepdim=True)
        p = torch.softmax(s, dim=-1)
        del s
        lses.append((s_max - torch.log(p.gather(-1, at))).squeeze(-1))
        outs.append(matmul_acc(p.to(v.dtype), v))
    return torch.cat(outs, dim=-2).to(v.dtype), torch.cat(lses, dim=-1)


def blocked_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, block: int | None = None,
    causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``softmax(scale q k^T) v``, the probabilities recomputed per block.

    ``p_ij = exp(scale q_i·k_j - lse_i)``, ``dv = p^T dout``, ``ds = p ∘ (dout v^T - rowsum(dout ∘ out))``,
    ``dq = scale ds k``, ``dk = scale ds^T q``. As ``attention_backward``: out (B, H, N, dv) and lse
    (B, H, N) may be those of a larger key set (then dq is this key block's share). ``causal``: as
    ``blocked_forward``.
    """
    acc = accumulation_dtype(q.dtype)
    block = block or query_block_size(q, k)
    in_place = not _tracked(dout, q, k, v, out, lse)
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)
    neg_lse = -lse.to(acc).unsqueeze(-1)
    k_t, v_t = k.transpose(-1, -2), v.transpose(-1, -2)
    dqs, dk, dv = [], None, None
    parts = zip(q.split(block, -2), dout.split(block, -2), neg_lse.split(block, -2), delta.split(block, -2))
    start = 0
    for q_b, dout_b, neg_lse_b, delta_b in parts:
        p = torch.add(neg_lse_b, matmul_acc(q_b, k_t), alpha=scale)
        p = p.exp_() if in_place else p.exp()
        if causal:
            mask = future_keys(start, q_b.shape[-2], k.shape[-2], q.device)
            p = p.masked_fill_(mask, 0.0) if in_place else p.masked_fill(mask, 0.0)
        start += q_b.shape[-2]
        dv_b = matmul_acc(p.to(v.dtype).transpose(-1, -2), dout_b)
        dp = matmul_acc(dout_b, v_t)
        ds = dp.sub_(delta_b).mul_(p) if in_place else (dp - delta_b) * p
        del p, dp
        # The factor scale of ds goes on the (N, d) products, not on the (N, M) block.
        ds = ds.to(q.dtype)
        dqs.append(matmul_acc(ds, k) * scale)
        dk_b = matmul_acc(ds.transpose(-1, -2), q_b) * scale
        dk = dk_b if dk is None else dk + dk_b
        dv = dv_b if dv is None else dv + dv_b
    return torch.cat(dqs, dim=-2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def blocked_jvp(
    q: Tensor, k: Tensor, v: Tensor, lse: Tensor, scale: float,
    tq: Tensor | None, tk: Tensor | None, tv: Tensor | None, block: int | None = None,
) -> Tensor:
    """Forward-mode derivative of ``out = softmax(scale q k^T) v`` along tangents (tq, tk, tv).

    ``ṡ = scale (q̇ k^T + q k̇^T)``, ``ṗ = p ∘ (ṡ - rowsum(p ∘ ṡ))``, ``ȯut = ṗ v + p v̇``; a tangent
    of None is zero. Shapes as ``blocked_forward``; returns (B, H, N, dv).
    """
    acc = accumulation_dtype(q.dtype)
    block = block or query_block_size(q, k)
    k_t = k.transpose(-1, -2)
    outs = []
    for start in range(0, q.shape[-2], block):
        rows = slice(start, start + block)
        q_b = q[..., rows, :]
        p = torch.exp(matmul_acc(q_b, k_t) * scale - lse[..., rows].to(acc).unsqueeze(-1))
        s_dot = torch.zeros_like(p)
        if tq is not None:
            s_dot = s_dot + matmul_acc(tq[..., rows, :], k_t) * scale
        if tk is not None:
            s_dot = s_dot + matmul_acc(q_b, tk.transpose(-1, -2)) * scale
        p_dot = p * (s_dot - (p * s_dot).sum(dim=-1, keepdim=True))
        out_dot = matmul_acc(p_dot.to(v.dtype), v)
        if tv is not None:
            out_dot = out_dot + matmul_acc(p.to(tv.dtype), tv)
        outs.append(out_dot)
    return torch.cat(outs, dim=-2).to(v.dtype)


__all__ = ["blocked_backward", "blocked_forward", "blocked_jvp", "future_keys", "matmul_acc", "query_block_size"]
