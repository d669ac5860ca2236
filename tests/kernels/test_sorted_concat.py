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


def test_exclusive_scan_of_growing_block_totals():
    # Each 128-row block's total dwarfs the rows before it: offsets taken as (inclusive scan - the
    # block's own total) lose those rows to rounding (1e-4 per row); an exclusive scan keeps them.
    x = torch.exp(torch.arange(1024, dtype=torch.float64) / 16)[None, :, None]
    want = torch.cumsum(x, dim=-2)
    got = exclusive_prefix_sum(x.float(), block=128)[:, 1:].double()
    assert ((got - want).abs() / want).max() < 1e-6


def test_g_growing_along_the_sort_order_float32():
    m = 1024
    phi = torch.linspace(1, 0, m, dtype=torch.float64)[None, None, :, None]  # sort key -b_j grows with j
    g = torch.exp(torch.arange(m, dtype=torch.float64) / 16)[None, None, :, None]
    theta = -torch.rand(1, 1, 500, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.ones(2, dtype=torch.float64)
    y = concat_sorted(theta.float(), phi.float(), g.float(), w.float()).double()
    want = naive_nonlocal(theta.float().double(), phi.float().double(), g.float().double(), "concatenation", 1.0, w)
    counted = want != 0
    # Per query row (a_i·Σg and Σbg cancel to ~1e-4 at the threshold; offsets lost ~7e-3 before).
    assert ((y - want).abs()[counted] / want.abs()[counted]).max() < 5e-4


def _same_pattern(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10) -> None:
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(test(got), test(want)), f"{name} at {test(got).nonzero().tolist()} != {test(want).nonzero().tolist()}"
    finite = torch.isfinite(want)
    if finite.any():
        assert_rel(got[finite], want[finite], tol, "finite entries")


def test_minus_inf_key_gives_the_formulas_finite_values():
    theta, phi, g, w = (t.requires_grad_() for t in _inputs(heads=1))
    with torch.no_grad():
        phi[0, 0, 3, 0] = -float("inf") * torch.sign(w[0, 5])  # b_3 = -inf: ReLU(a_i + b_3) = 0 for every i
    y = concat_sorted(theta, phi, g, w)
    ref = [t.detach().clone().requires_grad_() for t in (theta, phi, g, w)]
    want = naive_nonlocal(*ref[:3], "concatenation", 1.0, ref[3])
    assert torch.isfinite(want).all()
    _same_pattern(y, want)
    grad = torch.randn_like(want)
    for name, got, expected in zip(("theta", "phi", "g"), torch.autograd.grad(y, (theta, phi, g), grad),
                                   torch.autograd.grad(want, ref[:3], grad)):
        _same_pattern(got, expected)


@pytest.mark.parametrize("seed", range(40))
def test_nonfinite_entries_give_the_formulas_nan_inf_pattern(seed):
    # a = theta, b = phi (d = 1, w = [1, 1]): place inf, -inf, NaN and 0 in a, b and g at random.
    gen = torch.Generator().manual_seed(seed)
    a, b, g = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((2, 1, 9, 1), (2, 1, 11, 1), (2, 1, 11, 3)))
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0], dtype=torch.float64)
    for t in (a, b, g):
        flat = t.view(-1)
        spots = torch.randint(0, flat.numel(), (3,), generator=gen)
        flat[spots] = specials[torch.randint(0, 4, (3,), generator=gen)]
    w = torch.ones(2, dtype=torch.float64)
    _same_pattern(concat_sorted(a, b, g, w), naive_nonlocal(a, b, g, "concatenation", 1.0, w))


def test_second_order_gradients_match_the_oracle():
    leaves = [t.requires_grad_() for t in _inputs(n=13, m=11)]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    penalties = []
    for fn, xs in ((concat_sorted, leaves), (lambda *t: naive_nonlocal(*t[:3], "concatenation", 1.0, t[3]), ref)):
        y = fn(*xs)
        first = torch.autograd.grad((y * y.detach().cos()).sum(), xs, create_graph=True)
        penalties.append(torch.autograd.grad(sum((d * d).sum() for d in first), xs))
    for i, (got, want) in enumerate(zip(*penalties)):
        assert_rel(got, want, 1e-10, f"second-order gradient of input {i}")
    assert torch.autograd.gradgradcheck(concat_sorted, [t.detach().requires_grad_() for t in _inputs(n=5, m=4, d=2, dv=2)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_forward_and_backward(dtype):
    from nonlocal_dist import nonlocal_op

    theta, phi, g, w = (t.to(dtype).requires_grad_() for t in _inputs(heads=1, n=40, m=30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nonlocal_op(theta, phi, g.float() if dtype == torch.bfloat16 else g, "concatenation", concat_weight=w.float())
    assert y.dtype == torch.bfloat16
    # theta, phi and g meet in bf16 (the autocast dtype); concat_weight stays float32 (a = theta·w in float32).
    ref = [t.detach().bfloat16().double().requires_grad_() for t in (theta, phi, g)] + [w.detach().double().requires_grad_()]
    want = naive_nonlocal(*ref[:3], "concatenation", 1.0, ref[3])
    assert_rel(y, want, 2e-2, "y")
    grad = torch.randn_like(want).bfloat16()
    for i, (a, b) in enumerate(zip(torch.autograd.grad(y, (theta, phi, g, w), grad), torch.autograd.grad(want, ref, grad.double()))):
        assert_rel(a, b, 3e-2, f"grad of input {i}")


def test_torch_func_jacrev_and_vmap():
    theta, phi, g, w = _inputs(n=6, m=5, d=3, dv=2)
    jac = torch.func.jacrev(concat_sorted, argnums=(0, 1, 2, 3))(theta, phi, g, w)
    want = torch.func.jacrev(lambda *t: naive_nonlocal(*t[:3], "concatenation", 1.0, t[3]), argnums=(0, 1, 2, 3))(theta, phi, g, w)
    for i, (a, b) in enumerate(zip(jac, want)):
        assert_rel(a, b, 1e-12, f"jacobian in input {i}")
    stacked = [torch.stack([t, 2 * t, -t]) for t in (theta, phi, g)]  # (3, B, H, L, d)
    batched = torch.func.vmap(concat_sorted, in_dims=(0, 0, 0, None))(*stacked, w)
    looped = torch.stack([concat_sorted(t, p, v, w) for t, p, v in zip(*stacked)])
    assert_rel(batched, looped, 1e-12, "vmap")
