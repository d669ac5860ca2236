"""nonlocal_op on one device: every mode x backend against a float64 oracle, gradients included."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_rel
from nonlocal_dist import BACKENDS, MODES, nonlocal_op
from oracle import naive_nonlocal

CPU_BACKENDS = ["auto", "reference", "sdpa", "linear", "sorted"]
SIZES = [(37, 29, 8, 5), (1, 5, 4, 4), (64, 64, 16, 16), (5, 1, 3, 7), (130, 97, 6, 3)]


def _inputs(b, h, n, m, d, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, h) if h else (b,)
    theta = torch.randn(*shape, n, d, generator=gen, dtype=torch.float64)
    phi = torch.randn(*shape, m, d, generator=gen, dtype=torch.float64)
    g = torch.randn(*shape, m, dv, generator=gen, dtype=torch.float64)
    w = torch.randn(2 * d, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (theta, phi, g, w)]


PAIRS = [(m, b) for m in MODES for b in CPU_BACKENDS if b == "auto" or m in BACKENDS[b].modes]


@pytest.mark.parametrize("mode,backend", PAIRS)
@pytest.mark.parametrize("n,m,d,dv", SIZES)
@pytest.mark.parametrize("heads", [0, 3])
def test_matches_float64_oracle(mode, backend, n, m, d, dv, heads):
    scale = 0.5 if mode in ("gaussian", "embedded_gaussian") else None
    theta, phi, g, w = _inputs(2, heads, n, m, d, dv, torch.float32)
    w_arg = w if mode == "concatenation" else None
    y = nonlocal_op(theta, phi, g, mode, scale=scale, concat_weight=w_arg, backend=backend)
    leaves64 = [t.detach().double().requires_grad_() for t in (theta, phi, g, w)]
    t64, p64, g64, w64 = leaves64
    y64 = naive_nonlocal(t64, p64, g64, mode, scale or 1.0, w64 if mode == "concatenation" else None)
    assert_rel(y, y64, 1e-5, "y")
    grad_y = torch.randn(y64.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    inputs = [theta, phi, g] + ([w] if mode == "concatenation" else [])
    grads = torch.autograd.grad(y, inputs, grad_y.float())
    grads64 = torch.autograd.grad(y64, leaves64[: len(inputs)], grad_y)
    for name, got, want in zip(["theta", "phi", "g", "concat_weight"], grads, grads64):
        assert_rel(got, want, 1e-5, f"d{name}")


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    theta, phi, g, w = _inputs(2, 2, 5, 4, 3, 2, torch.float64, seed=3)
    if mode == "concatenation":
        fn = lambda t, p, v, cw: nonlocal_op(t, p, v, mode, concat_weight=cw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (theta, phi, g, w))
    else:
        fn = lambda t, p, v: nonlocal_op(t, p, v, mode)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (theta, phi, g))


def test_concat_weight_per_head():
    theta, phi, g, _ = _inputs(2, 3, 9, 7, 4, 5, torch.float64)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    y = nonlocal_op(theta, phi, g, "concatenation", concat_weight=w)
    assert_rel(y, naive_nonlocal(theta, phi, g, "concatenation", 1.0, w), 1e-12, "y")
    assert torch.autograd.gradcheck(lambda cw: nonlocal_op(theta, phi, g, "concatenation", concat_weight=cw), (w,))


def test_auto_picks_exact_fast_paths():
    from nonlocal_dist.backends import select_backend
    from nonlocal_dist.validate import check_op_inputs

    theta, phi, g, w = _inputs(1, 0, 6, 6, 4, 4, torch.float32)
    picked = {}
    for mode in MODES:
        inputs, _ = check_op_inputs(theta, phi, g, mode, None, w if mode == "concatenation" else None, "auto")
        picked[mode] = select_backend(inputs).name
    assert picked == {"gaussian": "sdpa", "embedded_gaussian": "sdpa", "dot_product": "linear", "concatenation": "sorted"}


def test_bfloat16_within_stated_tolerance():
    theta, phi, g, w = _inputs(2, 2, 50, 40, 16, 16, torch.float64)
    for mode in MODES:
        cw = w if mode == "concatenation" else None
        y = nonlocal_op(theta.bfloat16(), phi.bfloat16(), g.bfloat16(), mode, concat_weight=cw)
        assert y.dtype == torch.bfloat16
        assert_rel(y, naive_nonlocal(theta, phi, g, mode, 1.0, cw), 3e-2, mode)


def test_mixed_dtypes_meet_in_one_compute_dtype():
    """float32 theta/phi with float64 g promote to float64 (conventions.compute_dtype): no error."""
    theta, phi, g, _ = _inputs(2, 0, 6, 5, 4, 3, torch.float64)
    y = nonlocal_op(theta.float(), phi.float(), g)
    assert y.dtype == torch.float64
    assert_rel(y, naive_nonlocal(theta.float().double(), phi.float().double(), g, "embedded_gaussian"), 1e-12, "y")


def _bad(**overrides):
    theta, phi, g, w = (t.detach() for t in _inputs(2, 0, 6, 5, 4, 3, torch.float32))
    kwargs = {"theta": theta, "phi": phi, "g": g, "mode": "embedded_gaussian"}
    kwargs.update(overrides)
    return kwargs, w


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"mode": "cosine"}, ValueError, "unknown mode 'cosine'"),
        ({"backend": "flash9"}, ValueError, "unknown backend 'flash9'"),
        ({"theta": torch.randn(6, 4)}, ValueError, "all be \\(B, N, d\\)"),
        ({"theta": torch.randn(2, 6, 5)}, ValueError, "same channel size d"),
        ({"g": torch.randn(2, 4, 3)}, ValueError, "same number of key positions"),
        ({"phi": torch.randn(3, 5, 4)}, ValueError, "batch"),
        ({"g": torch.ones(2, 5, 3, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"theta": [1.0]}, TypeError, "torch.Tensor"),
        ({"scale": -1.0}, ValueError, "positive finite"),
        ({"scale": 2.0, "mode": "dot_product"}, ValueError, "softmax modes"),
        ({"mode": "concatenation"}, ValueError, "needs concat_weight"),
        ({"mode": "concatenation", "concat_weight": torch.randn(7)}, ValueError, "shape \\(8,\\)"),
        ({"concat_weight": torch.randn(8)}, ValueError, "only used by mode='concatenation'"),
        ({"backend": "linear"}, ValueError, "backend='linear' cannot run.*Backends that can: sdpa"),
        ({"backend": "xformers"}, ValueError, "xformers"),
        ({"theta": torch.randn(2, 0, 4)}, ValueError, "non-empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    kwargs, _ = _bad(**overrides)
    with pytest.raises(error, match=match):
        nonlocal_op(**kwargs)


def test_mismatched_devices_raise():
    if not torch.cuda.is_available():
        theta = torch.randn(2, 6, 4, device="meta")
        with pytest.raises(ValueError, match="one device"):
            nonlocal_op(theta, torch.randn(2, 5, 4), torch.randn(2, 5, 3))
    else:
        with pytest.raises(ValueError, match="one device"):
            nonlocal_op(torch.randn(2, 6, 4, device="cuda"), torch.randn(2, 5, 4), torch.randn(2, 5, 3))


def test_empty_positions_only_where_allowed():
    from nonlocal_dist.validate import check_op_inputs

    theta, phi, g = torch.randn(2, 0, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    inputs, _ = check_op_inputs(theta, phi, g, "dot_product", None, None, "auto", allow_empty_positions=True)
    assert inputs.theta.shape == (2, 1, 0, 4)
    with pytest.raises(ValueError, match="positions must be non-empty"):
        check_op_inputs(theta, phi, g, "dot_product", None, None, "auto")
    with pytest.raises(ValueError, match="channels must be non-empty"):
        check_op_inputs(torch.randn(2, 6, 0), torch.randn(2, 5, 0), g, "dot_product", None, None, "auto",
                        allow_empty_positions=True)


@pytest.mark.parametrize("mode", MODES)
def test_float16_sums_over_many_keys_do_not_overflow(mode):
    # Σ_j f_ij g_j reaches ~4096 x 64 = 2.6e5 > 65504 (float16's largest) before the division by M.
    gen = torch.Generator().manual_seed(0)
    theta, phi = (torch.full((1, n, 2), 8.0) + torch.rand(1, n, 2, generator=gen) for n in (3, 4096))
    g = torch.full((1, 4096, 2), 8.0) + torch.rand(1, 4096, 2, generator=gen)
    w = torch.tensor([0.5, 0.5, 0.5, 0.5]) if mode == "concatenation" else None
    scale = 1e-3 if mode in ("gaussian", "embedded_gaussian") else None
    y = nonlocal_op(theta.half(), phi.half(), g.half(), mode, concat_weight=w, scale=scale)
    rounded = (t.half().double() for t in (theta, phi, g))
    want = naive_nonlocal(*rounded, mode, scale or 1.0, None if w is None else w.double())
    assert_rel(y, want, 2e-3, mode)


def test_autocast_sets_the_compute_dtype():
    """Under CPU autocast the op runs in the autocast dtype (float32 sums), out of it in the input's."""
    theta, phi, g, _ = (t.detach() for t in _inputs(2, 0, 6, 5, 4, 3, torch.float32))
    assert nonlocal_op(theta, phi, g).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nonlocal_op(theta, phi, g)
    assert y.dtype == torch.bfloat16
    assert_rel(y, naive_nonlocal(theta.double(), phi.double(), g.double(), "embedded_gaussian"), 3e-2, "y")
