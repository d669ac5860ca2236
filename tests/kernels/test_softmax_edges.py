"""Edges of the softmax modes (issue 11): non-finite inputs give the formula's NaN/inf pattern in
every backend, double backward is correct, torch.func transforms work, torch.compile does not break."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_rel, assert_same_pattern, nonfinite_case
from nonlocal_dist import nonlocal_op
from oracle import naive_nonlocal

SOFTMAX_BACKENDS = ["auto", "sdpa", "blocked", "reference"]


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@pytest.mark.parametrize("m", [7, 15, 40])
@pytest.mark.parametrize("kind", ["nan query row", "nan key", "inf value", "-inf logit"])
def test_non_finite_inputs_give_the_formulas_pattern(backend, m, kind):
    """Issue 11 row 5: the CPU flash kernel gave zeros for a NaN query row with fewer than 16 keys."""
    theta, phi, g = nonfinite_case(kind, m)
    y = nonlocal_op(theta, phi, g, "embedded_gaussian", scale=0.5, backend=backend)
    want = naive_nonlocal(theta.double(), phi.double(), g.double(), "embedded_gaussian", 0.5)
    assert_same_pattern(y, want, f"{kind}, M = {m}, {backend}")


def test_nan_in_dot_product_follows_the_formula():
    theta, phi, g = nonfinite_case("nan query row", 9)
    y = nonlocal_op(theta, phi, g, "dot_product")
    assert_same_pattern(y, naive_nonlocal(theta.double(), phi.double(), g.double(), "dot_product"), "dot product")


def _small(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, 4, generator=gen, dtype=dtype).requires_grad_() for n in (7, 9, 9)]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "blocked"])
def test_double_backward_matches_the_formula(backend):
    """Issue 11 row 9: was a torch-internal error naming the CPU flash backward."""
    theta, phi, g = _small()
    inputs = (theta, phi, g)
    y = nonlocal_op(theta, phi, g, scale=0.7, backend=backend)
    y_ref = naive_nonlocal(theta, phi, g, "embedded_gaussian", 0.7)
    grad = torch.randn_like(y)
    first = torch.autograd.grad(y, inputs, grad, create_graph=True)
    first_ref = torch.autograd.grad(y_ref, inputs, grad, create_graph=True)
    w = [torch.randn_like(t) for t in first]
    second = torch.autograd.grad(sum((a * b).sum() for a, b in zip(first, w)), inputs)
    second_ref = torch.autograd.grad(sum((a * b).sum() for a, b in zip(first_ref, w)), inputs)
    for got, want, name in zip(second, second_ref, ("theta", "phi", "g")):
        assert_rel(got, want, 1e-10, f"second derivative wrt {name}")


def test_gradgradcheck_gaussian():
    x, _, g = _small(seed=1)
    assert torch.autograd.gradgradcheck(lambda x, g: nonlocal_op(x, x, g, "gaussian"), (x, g[:, :7]))


def test_torch_func_transforms_match_the_formula():
    """Issue 11 row 11: jacrev/vmap crashed (no setup_context)."""
    theta, phi, g = (t.detach() for t in _small(seed=2))

    def lib(t):
        return nonlocal_op(t, phi, g, scale=0.5)

    def ref(t):
        return naive_nonlocal(t, phi, g, "embedded_gaussian", 0.5)

    assert_rel(torch.func.jacrev(lib)(theta), torch.func.jacrev(ref)(theta), 1e-12, "jacrev")
    assert_rel(torch.func.jacfwd(lib)(theta), torch.func.jacrev(ref)(theta), 1e-12, "jacfwd")
    hessian = torch.func.hessian(lambda t: lib(t).square().sum())(theta)
    assert_rel(hessian, torch.func.hessian(lambda t: ref(t).square().sum())(theta), 1e-10, "hessian")
    batch = torch.randn(3, *theta.shape, dtype=theta.dtype)
    assert_rel(torch.func.vmap(lib)(batch), torch.stack([ref(t) for t in batch]), 1e-12, "vmap")
    keys = torch.randn(3, *phi.shape, dtype=phi.dtype)
    per_key = torch.func.vmap(lambda p: nonlocal_op(theta, p, g, scale=0.5))(keys)
    assert_rel(per_key, torch.stack([naive_nonlocal(theta, p, g, "embedded_gaussian", 0.5) for p in keys]), 1e-12, "vmap phi")


def test_torch_compile_traces_without_graph_breaks():
    x = torch.randn(2, 32, 8, requires_grad=True)
    explanation = torch._dynamo.explain(lambda t: nonlocal_op(t, t, t, "embedded_gaussian"))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
