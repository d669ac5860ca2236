"""The materialised non-local formula: the oracle every fast path is tested against."""
from __future__ import annotations

import torch
from torch import Tensor


def reference_nonlocal(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    mode: str,
    scale: float,
    concat_weight: Tensor | None = None,
) -> Tensor:
    """``y_i = 1/C(x) Σ_j f(theta_i, phi_j) g_j`` with the full (N, M) affinity in memory.

    Shapes: theta (B, H, N, d), phi (B, H, M, d), g (B, H, M, dv) -> y (B, H, N, dv);
    concat_weight (2d,) or (H, 2d). Low-precision inputs are computed in float32.
    """
    out_dtype = g.dtype
    if theta.dtype in (torch.float16, torch.bfloat16):
        theta, phi, g = theta.float(), phi.float(), g.float()
        concat_weight = None if concat_weight is None else concat_weight.float()
    m = phi.shape[-2]
    if mode in ("gaussian", "embedded_gaussian"):
        f = torch.softmax(scale * theta @ phi.transpose(-1, -2), dim=-1)
    elif mode == "dot_product":
        f = (theta @ phi.transpose(-1, -2)) / m
    elif mode == "concatenation":
        d = theta.shape[-1]
        w = concat_weight if concat_weight.dim() == 2 else concat_weight.expand(theta.shape[1], 2 * d)
        a = torch.einsum("bhnd,hd->bhn", theta, w[:, :d])
        b = torch.einsum("bhmd,hd->bhm", phi, w[:, d:])
        f = torch.relu(a[..., :, None] + b[..., None, :]) / m
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return (f @ g).to(out_dtype)
