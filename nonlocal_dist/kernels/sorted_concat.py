"""Concatenation affinity in O((N + M) log M): ReLU(a_i + b_j) splits over sorted keys.

With ``a_i = w_θ·theta_i`` and ``b_j = w_φ·phi_j``, ``ReLU(a_i + b_j)`` is non-zero exactly for the
keys with ``-b_j < a_i``. Sorting the keys by ``-b`` turns the sum over those keys into prefix sums:
``y_i = (a_i · P_g[c_i] + P_bg[c_i]) / M`` where ``c_i`` counts the keys with ``-b_j < a_i``.
The gradients are exact (ReLU'(0) = 0, as torch's): the backward applies ``F^T``, which has the same
form with queries and keys exchanged, so it is the same sort-and-prefix-sum pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def concat_projections(theta: Tensor, phi: Tensor, concat_weight: Tensor) -> tuple[Tensor, Tensor]:
    """``a = theta·w_θ`` (B, H, N) and ``b = phi·w_φ`` (B, H, M); concat_weight (2d,) or (H, 2d)."""
    d = theta.shape[-1]
    w = concat_weight if concat_weight.dim() == 2 else concat_weight.expand(theta.shape[1], 2 * d)
    a = torch.einsum("bhnd,hd->bhn", theta, w[:, :d].to(theta.dtype))
    b = torch.einsum("bhmd,hd->bhm", phi, w[:, d:].to(phi.dtype))
    return a, b


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, h, index[b, h, k], :]`` for x (B, H, M, C) and index (B, H, K) -> (B, H, K, C).

    One ``index_select`` over the flattened rows: its backward is an ``index_add`` of whole rows,
    much faster than the scatter behind ``torch.gather`` with an expanded index.
    """
    b, h, m, c = x.shape
    offsets = torch.arange(b * h, device=x.device).view(b, h, 1) * m
    rows = x.reshape(b * h * m, c).index_select(0, (index + offsets).reshape(-1))
    return rows.view(*index.shape, c)


def exclusive_prefix_sum(x: Tensor, block: int = 128) -> Tensor:
    """``out[..., k, :] = Σ_{r<k} x[..., r, :]`` (..., M+1, C) for x (..., M, C), as blocked matmuls.

    ``torch.cumsum`` along a non-last axis is a slow serial loop on CPU (and so is its backward);
    a lower-triangular (block × block) matmul per block plus a short cumsum of the block totals is
    the same sum, runs on BLAS, and its backward is matmuls again.
    """
    m = x.shape[-2]
    # A leading zero row turns the inclusive sum into the exclusive one; the tail fills the last block.
    columns = F.pad(x, (0, 0, 1, (-(m + 1)) % block)).unflatten(-2, (-1, block)).movedim(-2, 0)
    shape = columns.shape
    # One (block x block) @ (block x everything) GEMM: a broadcast matmul would expand tri per block.
    # The padded copy is dropped as soon as the GEMM has its operand (peak memory at large M).
    columns = columns.reshape(block, -1)
    tri = torch.ones(block, block, dtype=x.dtype, device=x.device).tril()
    within = (tri @ columns).view(shape).movedim(0, -2)
    del columns
    totals = within[..., -1, :]
    offsets = torch.cumsum(totals, dim=-2) - totals
    return (within + offsets.unsqueeze(-2)).flatten(-3, -2)[..., : m + 1, :]


def sorted_key_stats(b: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Keys ``-b`` sorted ascending (B, H, M) and packed prefix sums (B, H, M+1, 2·dv).

    ``prefix[..., k, :dv] = Σ_{r<k} g_(r)`` and ``prefix[..., k, dv:] = Σ_{r<k} b_(r) g_(r)`` over
    the keys in sorted order (a leading zero row for k = 0).
    """
    keys, order = torch.sort(-b, dim=-1)
    g_sorted = take_rows(g, order)
    packed = torch.cat([g_sorted, -keys.unsqueeze(-1) * g_sorted], dim=-1)
    del g_sorted
    return keys, exclusive_prefix_sum(packed)


def _prefix_rows(a: Tensor, keys: Tensor, prefix: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix sums over the keys with ``-b_j < a_i``: ``(Σ g_j, Σ b_j g_j)``, each (B, H, N, dv)."""
    count = torch.searchsorted(keys.contiguous(), a.detach().contiguous(), side="left")
    return take_rows(prefix, count).chunk(2, dim=-1)


def apply_sorted_stats(a: Tensor, keys: Tensor, prefix: Tensor) -> Tensor:
    """``Σ_j ReLU(a_i + b_j) g_j`` (B, H, N, dv) from sorted key statistics (not yet divided by M)."""
    p_g, p_bg = _prefix_rows(a, keys, prefix)
    return a.unsqueeze(-1) * p_g + p_bg


class _SortedConcat(torch.autograd.Function):
    """``y = F g / M`` with ``F_ij = ReLU(a_i + b_j)``; the backward uses ``F^T``, the same form with
    queries and keys swapped, so it is one more sort-and-prefix-sum pass instead of scatters."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, g: Tensor) -> Tensor:
        keys, prefix = sorted_key_stats(b, g)
        p_g, p_bg = _prefix_rows(a, keys, prefix)
        ctx.save_for_backward(a, b, g, p_g)
        return torch.addcmul(p_bg, a.unsqueeze(-1), p_g).div_(b.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        a, b, g, p_g = ctx.saved_tensors
        m = b.shape[-1]
        # dL/da_i = dy_i · Σ_{j: a_i + b_j > 0} g_j / M.
        da = torch.linalg.vecdot(dy, p_g).div_(m) if ctx.needs_input_grad[0] else None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return da, None, None
        # s_dy_j = Σ_{i: a_i + b_j > 0} dy_i and s_ady_j = Σ a_i dy_i: the forward's statistics with
        # the roles of (a, g) and (b, dy) exchanged; the strict inequality is the same pairs.
        keys_q, prefix_q = sorted_key_stats(a, dy)
        s_dy, s_ady = _prefix_rows(b, keys_q, prefix_q)
        db = torch.linalg.vecdot(g, s_dy).div_(m)
        dg = torch.addcmul(s_ady, b.unsqueeze(-1), s_dy).div_(m)
        return da, db, dg


def concat_sorted(theta: Tensor, phi: Tensor, g: Tensor, concat_weight: Tensor) -> Tensor:
    """``y_i = (1/M) Σ_j ReLU(w_θ·theta_i + w_φ·phi_j) g_j``, exact, without the (N, M) matrix.

    Shapes: theta (B, H, N, d), phi (B, H, M, d), g (B, H, M, dv), concat_weight (2d,) or (H, 2d)
    -> y (B, H, N, dv). Half-precision inputs accumulate their prefix sums in float32.
    """
    out_dtype = g.dtype
    if g.dtype in (torch.float16, torch.bfloat16):
        theta, phi, g, concat_weight = theta.float(), phi.float(), g.float(), concat_weight.float()
    a, b = concat_projections(theta, phi, concat_weight)
    return _SortedConcat.apply(a, b, g.contiguous()).to(out_dtype)
