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


def assert_same_pattern(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """NaN, +inf and -inf where ``want`` (the formula) has them, the finite entries within 1e-5."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at {torch.isnan(got).sum()} entries, formula {torch.isnan(want).sum()}"
    assert torch.equal(got == float("inf"), want == float("inf")), f"{what}: +inf pattern differs"
    assert torch.equal(got == -float("inf"), want == -float("inf")), f"{what}: -inf pattern differs"
    finite = torch.isfinite(want)
    assert_rel(got[finite], want[finite], 1e-5, what)


def nonfinite_case(kind: str, m: int):
    """theta (2, 20, 8), phi and g (2, m, 8) with one non-finite pattern: ``kind`` of "nan query row",
    "nan key", "inf value", "-inf logit" (anything else: all finite)."""
    gen = torch.Generator().manual_seed(m)
    theta, phi, g = (torch.randn(2, 20 if i == 0 else m, 8, generator=gen) for i in range(3))
    if kind == "nan query row":
        theta[0, 3, 1] = float("nan")
    elif kind == "nan key":
        phi[1, m // 2, 0] = float("nan")
    elif kind == "inf value":
        g[0, m - 1, 2] = float("inf")
    elif kind == "-inf logit":
        phi[0, 0, :] = 0.0
        theta[0, 5, :] = 0.0
        phi[0, 1, 0] = -float("inf")
        theta[0, 5, 0] = 1.0  # query 5 meets key 1 at -inf: weight exactly 0
    return theta, phi, g
