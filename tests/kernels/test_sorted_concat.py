"""Concatenation's sorted path: the blocked prefix sum at block edges, the custom backward with any
subset of inputs requiring gradients, heads, and half precision, against float64 oracles."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_rel
from nonlocal_dist.kernels.sorted_concat import concat_sorted, exclusive_prefix_sum
from oracle import naive_nonlocal


@pytest.mark.parametrize("m", [1, 127, 128, 129, 1000])
def test_exclusive_prefix_sum_at_block_edges(m):
    x = torch.randn(2, 3, m, 5, dtype=torch.float64)
    out = exclusive_prefix_sum(x, block=128)
    want = torch.cat([torch.zeros(2, 3, 1, 5, dtype=torch.float64), torch.cumsum(x, dim=-2)], dim=-2)
    assert out.shape == (2, 3, m + 1, 5)
    assert_rel(out, want, 1e-13, "prefix")


def _inputs(dtype=torch.float64, heads=3, n=37, m=29, d=5, dv=4):
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(2, heads, n, d, generator=gen, dtype=torch.float64)
    phi = torch.randn(2, heads, m, d, generator=gen, dtype=torch.float64)
    g = torch.randn(2, heads, m, dv, generator=gen, dtype=torch.float64)
    w = torch.randn(heads, 2 * d, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (theta, phi, g, w)]


@pytest.mark.parametrize("needs", [(0,), (2,), (1, 3), (0, 1, 2, 3)])
def test_gradients_for_any_subset_of_inputs(needs):
    leaves = _inputs()
    for i in needs:
        leaves[i].requires_grad_()
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    y = concat_sorted(*leaves)
    y_ref = naive_nonlocal(ref[0], ref[1], ref[2], "concatenation", 1.0, ref[3])
    assert_rel(y, y_ref, 1e-12, "y")
    grad = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, [leaves[i] for i in needs], grad)
    want = torch.autograd.grad(y_ref, [ref[i] for i in needs], grad)
    for i, a, b in zip(needs, got, want):
        assert_rel(a, b, 1e-12, f"grad of input {i}")


def test_bfloat16_accumulates_in_float32():
    leaves = [t.requires_grad_() for t in _inputs(torch.bfloat16, n=300, m=400)]
    y = concat_sorted(*leaves)
    assert y.dtype == torch.bfloat16
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = naive_nonlocal(ref[0], ref[1], ref[2], "concatenation", 1.0, ref[3])
    assert_rel(y, y_ref, 1e-2, "y")
    grad = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, leaves, grad.bfloat16())
    for i, (a, b) in enumerate(zip(got, torch.autograd.grad(y_ref, ref, grad))):
        assert a.dtype == torch.bfloat16
        assert_rel(a, b, 2e-2, f"grad of input {i}")
