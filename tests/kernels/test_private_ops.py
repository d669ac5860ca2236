"""Public first: one device runs ``F.scaled_dot_product_attention`` and never a private op; the ring's
per-block kernels (torch's private LSE-returning ops) are tried once per process, and a private op
that raises (a changed signature, a build without it) falls back to ``blocked`` with one warning
naming the op and the torch version, the results still exact."""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_rel
from oracle import naive_nonlocal

from nonlocal_dist import nonlocal_op
from nonlocal_dist.backends import OpInputs, select_block_kernel
from nonlocal_dist.kernels import softmax
from nonlocal_dist.kernels.softmax import LSE_KERNELS
from nonlocal_dist.sequence.ring import local_ring_attention

CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"
CPU_FLASH_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def _breaking(monkeypatch, name: str, error: type[Exception]) -> list:
    """Make ``torch.ops.aten.<name>`` raise ``error``, forget which kernels were tried; returns its calls."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise error(f"{name}() got an unexpected keyword argument 'scale'")

    monkeypatch.setattr(torch.ops.aten, name, broken)
    monkeypatch.setattr(softmax, "_WORKING", {})
    return calls


def _qkv(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, d, generator=gen, dtype=dtype) for n, d in ((13, 6), (11, 6), (11, 4)))
    return [t.requires_grad_() for t in (q, k, v)]


def _ring_against_oracle(world: int = 3) -> None:
    q, k, v = _qkv()
    y = local_ring_attention(q, k, v, 0.3, world)
    want = naive_nonlocal(q, k, v, "embedded_gaussian", 0.3)
    assert_rel(y, want, 1e-12, "y")
    grad = torch.randn_like(y)
    expected = torch.autograd.grad(want, (q, k, v), grad)
    for got, exp, name in zip(torch.autograd.grad(y, (q, k, v), grad), expected, "qkv"):
        assert_rel(got, exp, 1e-12, f"d{name}")


@pytest.mark.parametrize("name, error", [(CPU_FLASH, TypeError), (CPU_FLASH, AttributeError),
                                         (CPU_FLASH_BACKWARD, RuntimeError)])
def test_a_failing_private_op_falls_back_to_blocked_with_one_warning(monkeypatch, name, error):
    calls = _breaking(monkeypatch, name, error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _ring_against_oracle()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1, said
    assert f"torch.ops.aten.{name} failed on torch {torch.__version__}" in said[0] and "'blocked'" in said[0], said[0]
    assert len(calls) == 1  # tried once, on first use; never again in this process
    assert select_block_kernel(OpInputs(*(t.detach() for t in _qkv()), "embedded_gaussian", 0.3, None)) == "blocked"


def test_forced_sdpa_in_the_ring_falls_back_too(monkeypatch):
    _breaking(monkeypatch, CPU_FLASH, RuntimeError)
    inputs = OpInputs(*(t.detach() for t in _qkv()), "embedded_gaussian", 0.3, None)
    with pytest.warns(RuntimeWarning, match=CPU_FLASH):
        assert select_block_kernel(inputs, "sdpa") == "blocked"


def test_a_working_private_op_is_used_by_the_ring(monkeypatch):
    monkeypatch.setattr(softmax, "_WORKING", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ring_against_oracle()
    assert softmax._WORKING == {("cpu_flash", "cpu", torch.float64): True}
    assert set(LSE_KERNELS) == {"cpu_flash", "flash", "efficient", "blocked"}


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_one_device_calls_no_private_op(monkeypatch, backend):
    """The single-device path is the public call: a broken private op changes nothing there."""
    _breaking(monkeypatch, CPU_FLASH, RuntimeError)
    _breaking(monkeypatch, CPU_FLASH_BACKWARD, RuntimeError)
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = nonlocal_op(q, k, v, scale=0.3, backend=backend)
        grads = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
    want = naive_nonlocal(q, k, v, "embedded_gaussian", 0.3)
    assert_rel(y, want, 1e-12, "y")
    for got, exp, name in zip(grads, torch.autograd.grad(want, (q, k, v), torch.ones_like(want)), "qkv"):
        assert_rel(got, exp, 1e-12, f"d{name}")
    assert softmax._WORKING == {}


@pytest.mark.parametrize("dv", [6, 4])
def test_public_call_runs_torchs_fused_kernel(dv):
    """torch's CPU flash kernel, not its materialising math path (d != dv: zero-padded to one size)."""
    q, k, _ = (t.detach().float().requires_grad_() for t in _qkv())
    v = torch.randn(2, 2, 11, dv, requires_grad=True)
    with torch.profiler.profile() as prof:
        y = nonlocal_op(q, k, v, scale=0.3, backend="sdpa")
        y.sum().backward()
    names = {e.name for e in prof.events()}
    assert {"aten::scaled_dot_product_attention", f"aten::{CPU_FLASH}", f"aten::{CPU_FLASH_BACKWARD}"} <= names
    assert "aten::_safe_softmax" not in names and "aten::_softmax" not in names, sorted(names)
