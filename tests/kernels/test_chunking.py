"""Query and batch chunking in ``dispatch``: exact outputs and gradients, and the chunk sizes used."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_rel
from nonlocal_dist import nonlocal_op
from nonlocal_dist.backends import BACKENDS
from nonlocal_dist.kernels import preferred_chunk
from oracle import naive_nonlocal


def _recording_limits(monkeypatch, backend, batch, queries):
    """Give ``backend`` these limits and record the (B, N) of every call it receives."""
    cls = type(BACKENDS[backend])
    calls = []
    compute = cls.compute

    def recording_compute(self, inputs):
        calls.append((inputs.theta.shape[0], inputs.theta.shape[2]))
        return compute(self, inputs)

    monkeypatch.setattr(cls, "max_batch", lambda self, inputs: batch)
    monkeypatch.setattr(cls, "max_queries", lambda self, inputs: queries)
    monkeypatch.setattr(cls, "compute", recording_compute)
    return calls


@pytest.mark.parametrize(
    "mode, backend", [("embedded_gaussian", "sdpa"), ("gaussian", "sdpa"), ("dot_product", "linear"),
                      ("concatenation", "sorted")]
)
def test_query_and_batch_chunks_are_exact(monkeypatch, mode, backend):
    calls = _recording_limits(monkeypatch, backend, batch=2, queries=7)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(5, 2, 23, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    phi = theta if mode == "gaussian" else torch.randn(5, 2, 11, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 2, phi.shape[2], 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    cw = w if mode == "concatenation" else None
    inputs = list(dict.fromkeys((theta, phi, g) + ((w,) if cw is not None else ())))
    scale = 0.5 if mode in ("gaussian", "embedded_gaussian") else None
    y = nonlocal_op(theta, phi, g, mode, scale=scale, concat_weight=cw, backend=backend)
    # 5 batch entries in chunks of 2, 23 queries in chunks of 7: every call within both limits.
    assert sorted(calls) == sorted((b, n) for b in (2, 2, 1) for n in (7, 7, 7, 2))
    y_ref = naive_nonlocal(theta, phi, g, mode, scale or 1.0, cw)
    assert_rel(y, y_ref, 1e-12, "y")
    grad = torch.randn(y.shape, generator=gen, dtype=y.dtype)  # reproducible whatever ran before
    got = torch.autograd.grad(y, inputs, grad)
    want = torch.autograd.grad(y_ref, inputs, grad)
    for name, a, b in zip("θφgw" if mode != "gaussian" else "xgw", got, want):
        assert_rel(a, b, 1e-12, f"d{name}")


def test_no_chunks_without_a_limit(monkeypatch):
    calls = _recording_limits(monkeypatch, "sdpa", batch=None, queries=None)
    theta = torch.randn(3, 1, 50, 4)
    nonlocal_op(theta, theta, theta, backend="sdpa")
    assert calls == [(3, 50)]



def test_backward_chunk_per_device():
    # CPU: memory-bounded kernel calls; CUDA: whole blocks (512-position chunks were 174x slower
    # than one flash backward on a 32768-position block, issue 10).
    assert preferred_chunk("cpu") == 512 and preferred_chunk(torch.device("cpu")) == 512
    assert preferred_chunk("cuda") is None and preferred_chunk(torch.device("cuda", 0)) is None
