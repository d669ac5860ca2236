"""Concatenation affinity in O((N + M) log M): ReLU(a_i + b_j) splits over sorted keys.

With ``a_i = w_θ·theta_i`` and ``b_j = w_φ·phi_j``, ``ReLU(a_i + b_j)`` is non-zero exactly for the
keys with ``-b_j < a_i``. Sorting the keys by ``-b`` turns the sum over those keys into prefix sums:
``y_i = (a_i · P_g[c_i] + P_bg[c_i]) / M`` where ``c_i`` counts the keys with ``-b_j < a_i``.
Autograd through sort, cumsum and gather gives the exact gradients (ReLU'(0) = 0, as torch's).
"""
from __future__ import annotations

import torch
from torch import Tensor


def concat_projections(theta: Tensor, phi: Tensor, concat_weight: Tensor) -> tuple[Tensor, Tensor]:
    """``a = theta·w_θ`` (B, H, N) and ``b = phi·w_φ`` (B, H, M); concat_weight (2d,) or (H, 2d)."""
    d = theta.shape[-1]
    w = concat_weight if concat_weight.dim() == 2 else concat_weight.expand(theta.shape[1], 2 * d)
    a = torch.einsum("bhnd,hd->bhn", theta, w[:, :d].to(theta.dtype))
    b = torch.einsum("bhmd,hd->bhm", phi, w[:, d:].to(phi.dtype))
    return a, b


def sorted_key_stats(b: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keys ``-b`` sorted ascending (B, H, M) and prefix sums with a leading zero (B, H, M+1, dv).

    Returns ``(keys, P_g, P_bg)`` with ``P_g[k] = Σ_{r<k} g_(r)`` and ``P_bg[k] = Σ_{r<k} b_(r) g_(r)``
    over the keys in sorted order.
    """
    keys, order = torch.sort(-b, dim=-1)
    g_sorted = torch.gather(g, -2, order.unsqueeze(-1).expand(*order.shape, g.shape[-1]))
    zero = g_sorted.new_zeros(*g_sorted.shape[:-2], 1, g_sorted.shape[-1])
    p_g = torch.cat([zero, torch.cumsum(g_sorted, dim=-2)], dim=-2)
    p_bg = torch.cat([zero, torch.cumsum(-keys.unsqueeze(-1) * g_sorted, dim=-2)], dim=-2)
    return keys, p_g, p_bg


def apply_sorted_stats(a: Tensor, keys: Tensor, p_g: Tensor, p_bg: Tensor) -> Tensor:
    """``Σ_j ReLU(a_i + b_j) g_j`` (B, H, N, dv) from sorted key statistics (not yet divided by M)."""
    count = torch.searchsorted(keys.contiguous(), a.detach().contiguous(), side="left")
    index = count.unsqueeze(-1).expand(*count.shape, p_g.shape[-1])
    return a.unsqueeze(-1) * torch.gather(p_g, -2, index) + torch.gather(p_bg, -2, index)


def concat_sorted(theta: Tensor, phi: Tensor, g: Tensor, concat_weight: Tensor) -> Tensor:
    """``y_i = (1/M) Σ_j ReLU(w_θ·theta_i + w_φ·phi_j) g_j``, exact, without the (N, M) matrix.

    Shapes: theta (B, H, N, d), phi (B, H, M, d), g (B, H, M, dv), concat_weight (2d,) or (H, 2d)
    -> y (B, H, N, dv). Half-precision inputs accumulate their prefix sums in float32.
    """
    out_dtype = g.dtype
    if g.dtype in (torch.float16, torch.bfloat16):
        theta, phi, g, concat_weight = theta.float(), phi.float(), g.float(), concat_weight.float()
    a, b = concat_projections(theta, phi, concat_weight)
    keys, p_g, p_bg = sorted_key_stats(b, g)
    return (apply_sorted_stats(a, keys, p_g, p_bg) / phi.shape[-2]).to(out_dtype)
