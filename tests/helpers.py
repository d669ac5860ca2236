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


def torchvision_video():
    """``torchvision.models.video``, or a pytest skip saying why. The registry's torchvision is a CUDA
    build whose C++ operators do not load beside a CPU torch: its ``torchvision::`` fake-op
    registrations (detection ops, unused by the video models) are skipped while it imports."""
    import pytest
    import torch.library

    register_fake = torch.library.register_fake

    def skip_torchvision_ops(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return None if args else (lambda fn: fn)
        return register_fake(op, *args, **kwargs)

    torch.library.register_fake = skip_torchvision_ops
    try:
        import torchvision.models.video as video
    except Exception as exc:  # noqa: BLE001  (absent, or not importable beside this torch)
        pytest.skip(f"torchvision's video models are not usable here ({type(exc).__name__}: {exc})")
    finally:
        torch.library.register_fake = register_fake
    return video
