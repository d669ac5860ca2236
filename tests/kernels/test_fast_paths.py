"""The exact fast paths at their edges: large-magnitude gaussian, concatenation ties, larger sizes,
and batch chunking for backends with a size limit."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_rel, rel_err
from nonlocal_dist import nonlocal_op
from oracle import naive_nonlocal


def _grads(y, inputs, grad):
    return torch.autograd.grad(y, inputs, grad)


@pytest.mark.parametrize("magnitude", [10.0, 30.0])
def test_gaussian_large_magnitude_float32(magnitude):
    """|x| in the tens: logits of |x|^2 d ~ 1e3-1e5. Finite, and as accurate as float32 allows.

    Rounding the logits to float32 already costs ~1e-7 of their size, so the bound is the error of
    the materialised formula computed in float32 (or 1e-5, whichever is larger), not a fixed 1e-5;
    a factor 4 covers the fused backward recomputing exp(s - lse) from float32 logits and LSE
    where the materialised backward keeps the probabilities it computed once.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 16, generator=gen, dtype=torch.float64) * magnitude
    g = torch.randn(2, 300, 8, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 300, 8, generator=gen, dtype=torch.float64)
    results = {}
    for name, dtype, backend in (("fast", torch.float32, "auto"), ("fp32 materialised", torch.float32, "reference"),
                                 ("oracle", torch.float64, None)):
        xs, gs = x.to(dtype).requires_grad_(), g.to(dtype).requires_grad_()
        y = naive_nonlocal(xs, xs, gs, "gaussian") if backend is None else nonlocal_op(xs, xs, gs, "gaussian", backend=backend)
        results[name] = (y, *_grads(y, (xs, gs), grad.to(dtype)))
    for i, what in enumerate(("y", "dx", "dg")):
        fast, floor, oracle = results["fast"][i], results["fp32 materialised"][i], results["oracle"][i]
        assert torch.isfinite(fast).all(), what
        bound = max(1e-5, 4 * rel_err(floor, oracle))
        assert_rel(fast, oracle, bound, what)


def test_gaussian_large_magnitude_bfloat16():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 200, 16, generator=gen) * 20).bfloat16()
    g = torch.randn(2, 200, 8, generator=gen).bfloat16()
    y = nonlocal_op(x, x, g, "gaussian")
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    # Against the oracle on the same (bf16-rounded) inputs: rounding x itself moves logits of size
    # |x|^2 d by whole units, which no kernel can undo.
    assert_rel(y, naive_nonlocal(x.double(), x.double(), g.double(), "gaussian"), 2e-2, "y bf16")


def test_concatenation_ties_and_relu_boundary():
    # Small integers: a_i + b_j hits exactly 0 for many pairs and b has many repeated values.
    gen = torch.Generator().manual_seed(2)
    d = 3
    theta = torch.randint(-2, 3, (2, 40, d), generator=gen).double().requires_grad_()
    phi = torch.randint(-2, 3, (2, 33, d), generator=gen).double().requires_grad_()
    g = torch.randn(2, 33, 5, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    s = theta[..., 0][..., :, None] + phi[..., 0][..., None, :]
    assert (s == 0).sum() > 50 and phi[..., 0].unique().numel() <= 5
    inputs = (theta, phi, g, w)
    y = nonlocal_op(theta, phi, g, "concatenation", concat_weight=w)
    y_ref = naive_nonlocal(theta, phi, g, "concatenation", 1.0, w)
    assert_rel(y, y_ref, 1e-12, "y")
    grad = torch.randn_like(y)
    for got, want, name in zip(_grads(y, inputs, grad), _grads(y_ref, inputs, grad), "θφgw"):
        assert_rel(got, want, 1e-12, f"d{name}")


@pytest.mark.parametrize("mode", ["dot_product", "concatenation", "embedded_gaussian"])
def test_larger_sizes_exact_in_float64(mode):
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(1, 2, 2000, 8, generator=gen, dtype=torch.float64).requires_grad_()
    phi = torch.randn(1, 2, 1500, 8, generator=gen, dtype=torch.float64).requires_grad_()
    g = torch.randn(1, 2, 1500, 6, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(2, 16, generator=gen, dtype=torch.float64).requires_grad_()
    cw = w if mode == "concatenation" else None
    inputs = (theta, phi, g) + ((w,) if cw is not None else ())
    y = nonlocal_op(theta, phi, g, mode, concat_weight=cw)
    y_ref = naive_nonlocal(theta, phi, g, mode, 1.0, cw)
    assert_rel(y, y_ref, 1e-10, "y")
    grad = torch.randn_like(y)
    for got, want in zip(_grads(y, inputs, grad), _grads(y_ref, inputs, grad)):
        assert_rel(got, want, 1e-10, "grad")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation"])
def test_cuda_matches_float64_oracle(mode):
    gen = torch.Generator().manual_seed(5)
    theta, phi, g = (torch.randn(2, 2, 64, 16, generator=gen) for _ in range(3))
    w = torch.randn(32, generator=gen)
    cw = w if mode == "concatenation" else None
    y = nonlocal_op(theta.cuda(), phi.cuda(), g.cuda(), mode, concat_weight=None if cw is None else cw.cuda())
    assert_rel(y.cpu(), naive_nonlocal(theta.double(), phi.double(), g.double(), mode, 1.0, None if cw is None else cw.double()), 1e-4, "y")
