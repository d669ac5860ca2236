"""Comparison helpers shared by the tests."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def shaped_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max(max |expected|, 1)``; inf for a shape mismatch, 0 for empty tensors
    (a rank's empty shard)."""
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) in float64; absolute when expected is all 0.

    ``floor`` keeps gradients that are analytically zero (a bias followed by training-mode
    BatchNorm) from turning float32 rounding noise into a huge relative error.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(expected.abs().max().item(), floor) or 1.0
    return (actual - expected).abs().max().item() / scale


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", floor: float = 0.0) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out
