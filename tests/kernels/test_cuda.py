"""CUDA: every mode, backend and dtype against the float64 formula, a broken xformers, wide heads,
the kernels the ring calls, the block under autocast, and the ring schedule in one process.

Half-precision results are compared with the formula evaluated in float64 on the same
(half-rounded) inputs: rounding the inputs is not the kernel's error.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_rel
from oracle import naive_nonlocal
from test_dispatch import UNLOADED, broken_xformers, fresh_dispatch  # noqa: F401  (fixtures)

from nonlocal_dist import NonLocalBlock, nonlocal_op
from nonlocal_dist.backends import (
    AUTO_ORDER,
    BACKENDS,
    OpInputs,
    select_backend,
    select_block_kernel,
)
from nonlocal_dist.kernels.blocked_softmax import blocked_backward, blocked_forward
from nonlocal_dist.kernels.softmax import (
    attention_backward,
    attention_forward,
    preferred_chunk,
)
from nonlocal_dist.validate import check_op_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODES = ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]
# Relative tolerance of outputs and of gradients per dtype, against the formula on rounded inputs.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (3e-2, 6e-2), torch.float16: (1e-2, 2e-2)}


def _inputs(mode, dtype, n=96, m=80, d=32, dv=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(2, 2, n, d, generator=gen)
    phi = theta if mode == "gaussian" else torch.randn(2, 2, m, d, generator=gen)
    g = torch.randn(2, 2, phi.shape[2], dv, generator=gen)
    w = torch.randn(2 * d, generator=gen) if mode == "concatenation" else None
    cuda = [t.to("cuda", dtype) for t in (theta, phi, g)] + [None if w is None else w.to("cuda", dtype)]
    return [t if t is None else t.requires_grad_() for t in cuda]


def _able_backends(mode, dtype):
    theta, phi, g, w = _inputs(mode, dtype)
    inputs, _ = check_op_inputs(theta, phi, g, mode, None, w, "auto")
    return [name for name, b in BACKENDS.items() if not b.not_supported_reasons(inputs)]


CASES = [(mode, dtype, backend) for mode in MODES for dtype in TOLERANCE
         for backend in ["auto", *(_able_backends(mode, dtype) if torch.cuda.is_available() else [])]]


@pytest.mark.parametrize("mode, dtype, backend", CASES)
def test_every_mode_backend_and_dtype_against_the_formula(mode, dtype, backend):
    theta, phi, g, w = _inputs(mode, dtype)
    scale = 0.25 if mode in ("gaussian", "embedded_gaussian") else None
    y = nonlocal_op(theta, phi, g, mode, scale=scale, concat_weight=w, backend=backend)
    assert y.dtype == dtype and y.device.type == "cuda"
    leaves = list(dict.fromkeys(t for t in (theta, phi, g, w) if t is not None))
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref_of = dict(zip(leaves, ref_leaves))
    want = naive_nonlocal(ref_of[theta], ref_of[phi], ref_of[g], mode, scale or 1.0, None if w is None else ref_of[w])
    tol_y, tol_grad = TOLERANCE[dtype]
    assert_rel(y.cpu(), want, tol_y, "y")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, grad.to("cuda", dtype))
    expected = torch.autograd.grad(want, ref_leaves, grad)
    for a, b in zip(got, expected):
        assert_rel(a.cpu(), b, tol_grad, f"grad ({backend}, {dtype})")


def test_broken_xformers_is_skipped_by_auto_and_refused_when_forced(broken_xformers):
    broken_xformers.setitem(AUTO_ORDER, "cuda", ("xformers", *AUTO_ORDER["cuda"]))
    theta, phi, g, _ = _inputs("embedded_gaussian", torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = nonlocal_op(theta, phi, g)
        nonlocal_op(theta, phi, g)
    assert sum("skips xformers" in str(w.message) for w in caught) == 1
    want = naive_nonlocal(theta.double().cpu(), phi.double().cpu(), g.double().cpu(), "embedded_gaussian")
    assert_rel(y.cpu(), want, 2e-2, "y")
    with pytest.raises(ValueError, match="backend='xformers' cannot run") as info:
        nonlocal_op(theta, phi, g, backend="xformers")
    assert UNLOADED in str(info.value)


def test_installed_xformers_runs_or_says_why():
    pytest.importorskip("xformers")
    theta, phi, g, _ = _inputs("embedded_gaussian", torch.bfloat16, dv=32)
    inputs, _ = check_op_inputs(theta, phi, g, "embedded_gaussian", None, None, "xformers")
    reasons = BACKENDS["xformers"].not_supported_reasons(inputs)
    if reasons:
        with pytest.raises(ValueError, match="xformers"):
            nonlocal_op(theta, phi, g, backend="xformers")
    else:
        y = nonlocal_op(theta, phi, g, backend="xformers")
        want = naive_nonlocal(theta.double().cpu(), phi.double().cpu(), g.double().cpu(), "embedded_gaussian")
        assert_rel(y.cpu(), want, 2e-2, "y xformers")


@pytest.mark.parametrize("d", [320, 512])
def test_wide_heads_bfloat16(d):
    theta, phi, g, _ = _inputs("embedded_gaussian", torch.bfloat16, n=700, m=650, d=d, dv=d)
    assert select_block_kernel(_kernel_inputs(theta, phi, g)) == "blocked"
    y = nonlocal_op(theta, phi, g, scale=d**-0.5)
    leaves = [theta, phi, g]
    ref = [t.detach().double().cpu().requires_grad_() for t in leaves]
    want = naive_nonlocal(*ref, "embedded_gaussian", d**-0.5)
    assert_rel(y.cpu(), want, 2e-2, "y")
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, leaves, grad.to("cuda", torch.bfloat16)), torch.autograd.grad(want, ref, grad)):
        assert_rel(a.cpu(), b, 5e-2, "grad")


def test_auto_for_wide_heads_materialises_small_and_blocks_large():
    small = torch.empty(8, 1, 1568, 512, device="cuda", dtype=torch.bfloat16)  # I3D res4: 1568 x 392 keys
    keys = torch.empty(8, 1, 392, 512, device="cuda", dtype=torch.bfloat16)
    inputs, _ = check_op_inputs(small, keys, keys, "embedded_gaussian", None, None, "auto")
    assert select_backend(inputs).name == "reference"
    large = torch.empty(1, 1, 8192, 512, device="cuda", dtype=torch.bfloat16)
    inputs, _ = check_op_inputs(large, large, large, "embedded_gaussian", None, None, "auto")
    assert select_backend(inputs).name == "blocked"


def test_float64_runs_blocked_everywhere_and_sdpa_refuses_it():
    x = torch.randn(1, 1, 64, 16, device="cuda", dtype=torch.float64)
    inputs = _kernel_inputs(x, x, x)
    assert select_backend(inputs).name == "blocked" and select_block_kernel(inputs) == "blocked"
    for ask in (lambda: select_backend(inputs, "sdpa"), lambda: select_block_kernel(inputs, "sdpa")):
        with pytest.raises(ValueError, match="float64 on CUDA"):
            ask()


def _kernel_inputs(q, k, v):
    return OpInputs(q.detach(), k.detach(), v.detach(), "embedded_gaussian", 0.1, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 100, 512])
def test_ring_kernels_with_a_global_lse(dtype, d):
    """The contract the ring relies on: a key block's gradients from the output and LSE of all keys."""
    q, k, v, _ = (t.detach() if t is not None else None for t in _inputs("embedded_gaussian", dtype, n=300, m=260, d=d, dv=d))
    kernel = select_block_kernel(_kernel_inputs(q, k, v))
    assert kernel == "blocked" if d > 256 else kernel in ("flash", "efficient")
    out, lse = attention_forward(q, k, v, 0.1, kernel)
    ref_out, ref_lse = blocked_forward(q, k, v, 0.1)
    assert_rel(out, ref_out, TOLERANCE[dtype][0], "out")
    assert_rel(lse, ref_lse, 1e-3, "lse")
    dout = torch.randn_like(out)
    keys = slice(0, 130)
    got = attention_backward(dout, q, k[..., keys, :], v[..., keys, :], out, lse, 0.1, kernel)
    want = blocked_backward(dout, q, k[..., keys, :], v[..., keys, :], ref_out, ref_lse, 0.1)
    for a, b, name in zip(got, want, "qkv"):
        assert_rel(a, b, TOLERANCE[dtype][1], f"d{name}")


def test_flash_is_the_half_precision_kernel_and_backward_takes_whole_blocks():
    q = torch.empty(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability() >= (8, 0) and torch.backends.cuda.is_flash_attention_available():
        assert select_block_kernel(_kernel_inputs(q, q, q)) == "flash"
    assert select_block_kernel(_kernel_inputs(q.float(), q.float(), q.float())) == "efficient"
    assert preferred_chunk(q.device) is None and preferred_chunk("cpu") == 512


def test_fp16_logits_past_the_half_range_stay_finite():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 1, 64, 8, generator=gen) * 100).half().cuda()
    g = torch.randn(1, 1, 64, 8, generator=gen).half().cuda()
    want = naive_nonlocal(x.double().cpu(), x.double().cpu(), g.double().cpu(), "gaussian")
    for backend in ("auto", "blocked", "reference"):
        y = nonlocal_op(x, x, g, "gaussian", backend=backend)
        assert torch.isfinite(y).all(), backend
        assert_rel(y.cpu(), want, 5e-3, backend)


def test_nan_query_row_gives_a_nan_row():
    theta, phi, g, _ = (t.detach() if t is not None else None for t in _inputs("embedded_gaussian", torch.float32, m=9))
    theta[0, 0, 3, 1] = float("nan")
    for backend in ("auto", "blocked", "reference"):
        y = nonlocal_op(theta, phi, g, backend=backend).cpu()
        want = naive_nonlocal(theta.double().cpu(), phi.double().cpu(), g.double().cpu(), "embedded_gaussian")
        assert torch.equal(torch.isnan(y), torch.isnan(want)), backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_block_under_autocast(mode, dtype):
    torch.manual_seed(0)
    block = NonLocalBlock(16, mode=mode, sub_sample=True).cuda()
    torch.nn.init.normal_(block.norm.weight)
    x = torch.randn(2, 16, 4, 8, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        z = block(x)
    z.float().square().sum().backward()
    assert torch.isfinite(z).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)
    x32 = x.detach().clone()
    assert_rel(z.float(), block(x32), 5e-2, "autocast vs float32")


def test_ring_schedule_in_one_process():
    ring = pytest.importorskip("nonlocal_dist.sequence.ring")
    q, k, v, _ = _inputs("embedded_gaussian", torch.bfloat16, n=512, m=512, d=64, dv=64)
    y = ring.local_ring_attention(q, k, v, 0.125, 4)
    leaves = [q, k, v]
    ref = [t.detach().double().cpu().requires_grad_() for t in leaves]
    want = naive_nonlocal(*ref, "embedded_gaussian", 0.125)
    assert_rel(y.cpu(), want, 2e-2, "y")
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, leaves, grad.to("cuda", torch.bfloat16)), torch.autograd.grad(want, ref, grad)):
        assert_rel(a.cpu(), b, 5e-2, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_kernels_and_zigzag_ring_schedule_on_cuda(dtype):
    """The per-block kernels' causal flag (the fused ops' is_causal) and the zigzag ring in one process."""
    from nonlocal_dist.sequence.causal import local_causal_ring_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 96, 64, generator=gen).to("cuda", dtype).requires_grad_() for _ in range(3))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    s = 0.125 * ref_leaves[0] @ ref_leaves[1].transpose(-1, -2)
    s = s.masked_fill(torch.ones(96, 96, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    want = torch.softmax(s, -1) @ ref_leaves[2]
    y = local_causal_ring_attention(q, k, v, 0.125, 3)
    out_tol, grad_tol = TOLERANCE[dtype]
    assert_rel(y.double(), want, out_tol, "y")
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), grad.to(dtype)), torch.autograd.grad(want, ref_leaves, grad)):
        assert_rel(a.double(), b, grad_tol, "grad")
