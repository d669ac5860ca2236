"""Dispatch never picks a backend that cannot run: xformers is asked whether it can run the inputs.

A broken xformers (a wheel built for another torch: it imports, but its CUDA operators did not
load) is simulated by a package in ``sys.modules`` whose operators all report themselves
unsupported, and whose dispatcher raises ``NotImplementedError`` listing them, as xformers' does.
"""
from __future__ import annotations

import sys
import types
import warnings
from dataclasses import dataclass

import pytest
import torch

from helpers import assert_rel
from nonlocal_dist import nonlocal_op
from nonlocal_dist import backends
from nonlocal_dist.backends import AUTO_ORDER, BACKENDS, load_xformers_fmha, select_backend
from nonlocal_dist.validate import check_op_inputs
from oracle import naive_nonlocal

UNLOADED = "operator wasn't built - see `python -m xformers.info` for more info"


@dataclass
class _Inputs:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_bias: object = None
    p: float = 0.0
    scale: float | None = None


class _UnloadedOp:
    """An xformers operator whose extension did not load."""

    def __init__(self, name: str):
        self.NAME = name

    def not_supported_reasons(self, inp) -> list[str]:
        return [UNLOADED]


def _run_priority_list(name, ops, inp):
    reasons = {op.NAME: op.not_supported_reasons(inp) for op in ops}
    for op in ops:
        if not reasons[op.NAME]:
            return op
    lines = [f"No operator found for `{name}` with inputs:", f"     query : shape={tuple(inp.query.shape)}"]
    for op_name, why in reasons.items():
        lines += [f"`{op_name}` is not supported because:", *(f"    {r}" for r in why)]
    raise NotImplementedError("\n".join(lines))


def _broken_xformers() -> dict[str, types.ModuleType]:
    fmha = types.ModuleType("xformers.ops.fmha")
    dispatch = types.ModuleType("xformers.ops.fmha.dispatch")
    fw_ops, bw_ops = [_UnloadedOp("fa2F@v2"), _UnloadedOp("cutlassF")], [_UnloadedOp("fa2B@v2"), _UnloadedOp("cutlassB")]
    dispatch._dispatch_fw = lambda inp, needs_gradient: _run_priority_list(
        "memory_efficient_attention_forward", fw_ops, inp)
    dispatch._dispatch_bw = lambda inp, varlen_lse_packed: _run_priority_list(
        "memory_efficient_attention_backward", bw_ops, inp)
    fmha.Inputs, fmha.dispatch = _Inputs, dispatch
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        dispatch._dispatch_fw(_Inputs(query, key, value, attn_bias, p, scale), False)

    ops.memory_efficient_attention = memory_efficient_attention
    root = types.ModuleType("xformers")
    root.ops = ops
    return {"xformers": root, "xformers.ops": ops, "xformers.ops.fmha": fmha, "xformers.ops.fmha.dispatch": dispatch}


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Forget what was loaded and said, before and after the test."""
    load_xformers_fmha.cache_clear()
    monkeypatch.setattr(backends, "_SAID", set())
    yield monkeypatch
    load_xformers_fmha.cache_clear()


@pytest.fixture
def broken_xformers(fresh_dispatch):
    for name, module in _broken_xformers().items():
        fresh_dispatch.setitem(sys.modules, name, module)
    return fresh_dispatch


def _inputs(requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 40, 8, generator=gen, dtype=torch.float32).requires_grad_(requires_grad) for _ in range(3)]


def test_forced_broken_xformers_raises_its_own_reason(broken_xformers):
    theta, phi, g = _inputs()
    with pytest.raises(ValueError, match="backend='xformers' cannot run") as info:
        nonlocal_op(theta, phi, g, backend="xformers")
    message = str(info.value)
    assert "No operator found for `memory_efficient_attention_forward`" in message
    assert UNLOADED in message and "cutlassF" in message
    assert "Backends that can: sdpa, blocked, reference" in message


def test_backward_operators_are_asked_when_a_gradient_is_needed(broken_xformers):
    fmha = sys.modules["xformers.ops.fmha"]
    broken_xformers.setattr(fmha.dispatch, "_dispatch_fw", lambda inp, needs_gradient: None)
    inputs, _ = check_op_inputs(*_inputs(requires_grad=True), "embedded_gaussian", None, None, "xformers")
    assert "memory_efficient_attention_backward" in BACKENDS["xformers"].runtime_reasons(inputs)[0]
    with torch.no_grad():
        assert BACKENDS["xformers"].runtime_reasons(inputs) == []


def test_auto_falls_through_a_broken_xformers_and_says_why_once(broken_xformers):
    # Were xformers preferred on this device, auto would still run the inputs elsewhere.
    broken_xformers.setitem(AUTO_ORDER, "cpu", ("xformers", *AUTO_ORDER["cpu"]))
    theta, phi, g = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [nonlocal_op(theta, phi, g, scale=0.3) for _ in range(3)]
    said = [w for w in caught if "skips xformers" in str(w.message)]
    assert len(said) == 1 and UNLOADED in str(said[0].message), [str(w.message) for w in caught]
    want = naive_nonlocal(theta.double(), phi.double(), g.double(), "embedded_gaussian", 0.3)
    for y in ys:
        assert_rel(y, want, 1e-5, "y")


def test_missing_xformers_is_skipped_quietly(fresh_dispatch):
    fresh_dispatch.setitem(sys.modules, "xformers", None)  # import raises ModuleNotFoundError
    fresh_dispatch.setitem(AUTO_ORDER, "cpu", ("xformers", *AUTO_ORDER["cpu"]))
    theta, phi, g = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nonlocal_op(theta, phi, g)
    with pytest.raises(ValueError, match="xformers is not installed"):
        nonlocal_op(theta, phi, g, backend="xformers")


@pytest.mark.parametrize("mode, want", [("gaussian", "sdpa"), ("embedded_gaussian", "sdpa"),
                                        ("dot_product", "linear"), ("concatenation", "sorted")])
def test_auto_on_cpu_follows_the_one_order(mode, want):
    theta, phi, g = _inputs(requires_grad=False)
    w = torch.randn(16) if mode == "concatenation" else None
    inputs, _ = check_op_inputs(theta, theta if mode == "gaussian" else phi, g, mode, None, w, "auto")
    assert select_backend(inputs).name == want
    assert all(name in BACKENDS for order in AUTO_ORDER.values() for name in order)


def test_wide_heads_on_cpu_run_blocked_not_reference():
    theta = torch.randn(1, 1, 8, 300)
    inputs, _ = check_op_inputs(theta, theta, theta, "embedded_gaussian", None, None, "auto")
    assert select_backend(inputs).name == "blocked"
    with pytest.raises(ValueError, match=r"backend='sdpa' cannot run.*head size 300 > 256.*Backends that can: blocked"):
        select_backend(inputs, "sdpa")
