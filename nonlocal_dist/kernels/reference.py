"""The materialised non-local formula: the oracle every fast path is tested against."""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.conventions import accumulation_dtype
from nonlocal_dist.kernels.affinity import affinity_matrix


def reference_nonlocal(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    mode: str,
    scale: float,
    concat_weight: Tensor | None = None,
) -> Tensor:
    """``y_i = 1/C(x) Σ_j f(theta_i, phi_j) g_j`` with the full (N, M) affinity in memory.

    Shapes: theta (B, H, N, d), phi (B, H, M, d), g (B, H, M, dv) -> y (B, H, N, dv) in g's dtype;
    concat_weight (2d,) or (H, 2d). Half-precision inputs are computed in float32, autocast off.
    """
    out_dtype = g.dtype
    acc = accumulation_dtype(g.dtype)
    with torch.autocast(g.device.type, enabled=False):
        theta, phi, g = theta.to(acc), phi.to(acc), g.to(acc)
        concat_weight = None if concat_weight is None else concat_weight.to(acc)
        f = affinity_matrix(theta, phi, mode, scale, concat_weight)
        return (f @ g).to(out_dtype)
