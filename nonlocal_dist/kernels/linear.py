"""Dot-product affinity in linear time: with C = M the sum is associative."""
from __future__ import annotations

import torch
from torch import Tensor


def dot_product_linear(theta: Tensor, phi: Tensor, g: Tensor) -> Tensor:
    """``y = theta (phi^T g) / M`` in O(N·d·dv) time and O((N + M)·d) memory, exact.

    Shapes: theta (B, H, N, d), phi (B, H, M, d), g (B, H, M, dv) -> y (B, H, N, dv).
    Autograd through the two matmuls gives the exact gradients of the materialised form.
    """
    kv = torch.matmul(phi.transpose(-1, -2), g) / phi.shape[-2]
    return torch.matmul(theta, kv)
