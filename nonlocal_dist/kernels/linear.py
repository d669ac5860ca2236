"""Dot-product affinity in linear time: with C = M the sum is associative."""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.conventions import accumulation_dtype


def dot_product_linear(theta: Tensor, phi: Tensor, g: Tensor) -> Tensor:
    """``y = theta (phi^T g) / M`` in O(N·d·dv) time and O((N + M)·d) memory, exact.

    Shapes: theta (B, H, N, d), phi (B, H, M, d), g (B, H, M, dv) -> y (B, H, N, dv) in theta's dtype.
    The sum over the M keys runs in the accumulation dtype (float32 for half inputs: a float16
    ``phi^T g`` overflows long before its mean does), autocast off. Autograd through the two
    matmuls gives the exact gradients of the materialised form.
    """
    acc = accumulation_dtype(g.dtype)
    with torch.autocast(g.device.type, enabled=False):
        kv = torch.matmul(phi.transpose(-1, -2).to(acc), g.to(acc)) / phi.shape[-2]
        return torch.matmul(theta, kv.to(theta.dtype))
