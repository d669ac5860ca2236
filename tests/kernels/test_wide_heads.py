"""The query-blocked softmax path: exact for any head width, blocks sized from memory, float32
scores for half inputs (no fp16 overflow), and the one rule for wide heads (blocked, never sdpa)."""
from __future__ import annotations

import pytest
import torch

from helpers import LargestTensor, assert_rel
from nonlocal_dist import nonlocal_op
from nonlocal_dist.kernels import blocked_softmax
from nonlocal_dist.kernels.blocked_softmax import blocked_backward, blocked_forward, query_block_size
from nonlocal_dist.backends import OpInputs, select_backend, select_block_kernel
from nonlocal_dist.kernels.softmax import attention_backward, attention_forward, working
from oracle import naive_nonlocal


def _qkv(b, h, n, m, d, dv, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    k = torch.randn(b, h, m, d, generator=gen, dtype=dtype)
    v = torch.randn(b, h, m, dv, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("backend", ["auto", "blocked"])
@pytest.mark.parametrize("d, dv", [(300, 260), (5, 3), (257, 512)])
def test_exact_in_float64_with_many_blocks(monkeypatch, backend, d, dv):
    # A budget of 7 query rows per block: 50 queries run in 8 blocks, the last one short.
    monkeypatch.setattr(blocked_softmax, "query_block_size", lambda q, k: 7)
    q, k, v = _qkv(2, 2, 50, 33, d, dv)
    y = nonlocal_op(q, k, v, "embedded_gaussian", scale=d**-0.5, backend=backend)
    want = naive_nonlocal(q, k, v, "embedded_gaussian", d**-0.5)
    assert_rel(y, want, 1e-12, "y")
    grad = torch.randn_like(y)
    for got, exp, name in zip(torch.autograd.grad(y, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad), "qkv"):
        assert_rel(got, exp, 1e-12, f"d{name}")


def _op_inputs(d, dv, dtype=torch.float32):
    q, v = torch.empty(1, 1, 4, d, dtype=dtype), torch.empty(1, 1, 4, dv, dtype=dtype)
    return OpInputs(q, q, v, "embedded_gaussian", 1.0, None)


@pytest.mark.parametrize("d, dv", [(257, 8), (8, 300)])
def test_wide_heads_take_the_blocked_path_everywhere(d, dv):
    # One rule for the single-device dispatch and the ring's per-block kernels.
    inputs = _op_inputs(d, dv)
    assert select_backend(inputs).name == "blocked" and select_block_kernel(inputs) == "blocked"
    for ask in (lambda: select_backend(inputs, "sdpa"), lambda: select_block_kernel(inputs, "sdpa")):
        with pytest.raises(ValueError, match=f"head size {max(d, dv)} > 256"):
            ask()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heads_up_to_256_take_the_fused_kernels(dtype):
    inputs = _op_inputs(256, 256, dtype)
    assert select_backend(inputs).name == "sdpa" and select_block_kernel(inputs) == "cpu_flash"


def test_blocked_holds_one_block_of_scores(monkeypatch):
    monkeypatch.setattr(blocked_softmax, "CPU_BLOCK_BUDGET", 64 * 1024 * 16)  # 64 rows of 1024 keys
    q, k, v = _qkv(1, 1, 1024, 1024, 264, 264, dtype=torch.float32)
    assert query_block_size(q, k) == 64
    with LargestTensor() as seen:
        y = nonlocal_op(q, k, v, scale=264**-0.5)
        y.backward(torch.ones_like(y))
    # Inputs hold 1024 x 264 values; the materialised affinity would be 1024 x 1024.
    assert seen.numel <= 1024 * 264, seen.numel


def test_block_size_from_the_cpu_budget(monkeypatch):
    monkeypatch.setattr(blocked_softmax, "CPU_BLOCK_BUDGET", 2**20)
    q, k = torch.empty(2, 4, 5000, 8), torch.empty(2, 4, 100, 8)
    # 2^20 bytes / (2 * 4 * 100 keys * 16 bytes) = 81 rows, rounded down to a multiple of 64.
    assert query_block_size(q, k) == 64
    assert query_block_size(q[..., :50, :], k) == 50  # every query in one block
    assert query_block_size(q, torch.empty(2, 4, 10**6, 8)) == 1  # never below one row


@pytest.mark.parametrize("path", ["blocked", "ring block kernel", "nonlocal_op"])
def test_fp16_logits_past_the_half_range_stay_finite(path):
    # Logits |x|^2 ~ 8e4 > 65504: an fp16 score would be inf and the softmax NaN. The fused kernels
    # keep them finite (float32 scores), as does the blocked kernel.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 1, 40, 8, generator=gen) * 100).half()
    g = torch.randn(1, 1, 40, 8, generator=gen).half()
    if path == "nonlocal_op":
        out = nonlocal_op(x, x, g, "gaussian")
        lse = torch.zeros(1)
    elif path == "blocked":
        out, lse = blocked_forward(x, x, g, 1.0)
    else:
        kernel = "cpu_flash" if working("cpu_flash", x.device, x.dtype) else "blocked"
        out, lse = attention_forward(x, x, g, 1.0, kernel)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and torch.isfinite(lse).all()
    want = naive_nonlocal(x.double(), x.double(), g.double(), "gaussian")
    assert_rel(out, want, 2e-3, "out fp16")


def test_blocked_backward_with_a_global_lse_gives_a_key_blocks_share():
    # The ring's contract: gradients of one key block from the output and LSE of all keys.
    q, k, v = _qkv(1, 2, 20, 30, 6, 4)
    out, lse = blocked_forward(q, k, v, 0.5)
    dout = torch.randn_like(out)
    whole = blocked_backward(dout, q, k, v, out, lse, 0.5)
    halves = [blocked_backward(dout, q, k[..., s, :], v[..., s, :], out, lse, 0.5, block=3)
              for s in (slice(0, 13), slice(13, 30))]
    assert_rel(halves[0][0] + halves[1][0], whole[0], 1e-12, "dq")
    assert_rel(torch.cat([halves[0][1], halves[1][1]], -2), whole[1], 1e-12, "dk")
    fused = attention_backward(dout, q, k, v, out, lse, 0.5, "cpu_flash")
    for a, b, name in zip(whole, fused, "qkv"):
        assert_rel(a, b, 1e-12, f"d{name} vs fused")


def test_bfloat16_against_the_formula_on_rounded_inputs():
    q, k, v = (t.detach().bfloat16() for t in _qkv(2, 1, 64, 48, 300, 300, dtype=torch.float32, seed=4))
    y = nonlocal_op(q, k, v, scale=300**-0.5)
    assert y.dtype == torch.bfloat16
    assert_rel(y, naive_nonlocal(q.double(), k.double(), v.double(), "embedded_gaussian", 300**-0.5), 1e-2, "y bf16")


@pytest.mark.parametrize("path", ["forward", "backward"])
def test_scores_stay_float32_under_autocast(path):
    # Autocast would run a float32 matmul in bfloat16: errors of 1e-2 instead of 1e-6.
    q, k, v = (t.detach().float() for t in _qkv(1, 2, 40, 30, 300, 8, seed=5))
    out, lse = blocked_forward(q.double(), k.double(), v.double(), 0.1)
    dout = torch.randn_like(out)
    want = blocked_backward(dout, q.double(), k.double(), v.double(), out, lse, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_out, got_lse = blocked_forward(q, k, v, 0.1)
        got = blocked_backward(dout.float(), q, k, v, out.float(), lse.float(), 0.1)
    if path == "forward":
        assert got_out.dtype == torch.float32
        assert_rel(got_out, out, 1e-5, "out")
        assert_rel(got_lse, lse, 1e-6, "lse")
    else:
        for a, b, name in zip(got, want, "qkv"):
            assert_rel(a, b, 1e-5, f"d{name}")
