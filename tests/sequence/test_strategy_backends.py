"""Every sequence-parallel strategy x every backend on 2 gloo ranks: the backend is honoured (the
result and every gradient equal the float64 single-process oracle, and the backend's kernels ran) or
refused on every rank with a ValueError naming the strategy, the backend and the reason.

All pairs run in one spawn of the ranks (a module fixture); each pair is its own test.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import rel_err
from oracle import naive_nonlocal

from nonlocal_dist import nonlocal_op
from nonlocal_dist.backends import BACKENDS
from nonlocal_dist.sequence import allgather, ring, ulysses
from nonlocal_dist.testing import run_ranks

WORLD = 2
STRATEGY_MODES = {"ring": "embedded_gaussian", "allgather": None, "ulysses": None,
                  "allreduce": "dot_product", "sorted_stats": "concatenation"}
BACKEND_NAMES = ["auto", *BACKENDS]
# What each strategy runs (CPU, float64, d = 8, dv = 5): the per-block kernel the ring (and the
# all-gather and Ulysses, for the backends that have one) calls, or the backend the single-device
# dispatch runs; None: refused, with a phrase of the reason.
HONOURED = {
    **{(s, b): k for s in ("ring", "allgather", "ulysses") for b, k in (
        ("auto", "cpu_flash"), ("sdpa", "cpu_flash"), ("blocked", "blocked"))},
    **{(s, b): b for s in ("allgather", "ulysses") for b in ("reference", "linear", "sorted")},
    ("allreduce", "auto"): "own", ("allreduce", "linear"): "own",
    ("sorted_stats", "auto"): "own", ("sorted_stats", "sorted"): "own",
}
REFUSAL = {"ring": "per-block kernel|not supported", "allgather": "xformers is not installed",
           "ulysses": "xformers is not installed", "allreduce": "formula across the group",
           "sorted_stats": "formula across the group"}
PAIRS = [(s, b) for s in STRATEGY_MODES for b in BACKEND_NAMES]


def _mode(strategy: str, backend: str) -> str:
    if STRATEGY_MODES[strategy]:
        return STRATEGY_MODES[strategy]
    return {"linear": "dot_product", "sorted": "concatenation"}.get(backend, "embedded_gaussian")


def _data(mode: str):
    gen = torch.Generator().manual_seed(7)
    b, h, n, m, d, dv = 2, 2, 13, 11, 8, 5  # uneven shards, N != M, d != dv
    theta = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    phi = theta if mode == "gaussian" else torch.randn(b, h, m, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, h, phi.shape[2], dv, generator=gen, dtype=torch.float64)
    w = torch.randn(2 * d, generator=gen, dtype=torch.float64) if mode == "concatenation" else None
    grad_y = torch.randn(b, h, n, dv, generator=gen, dtype=torch.float64)
    return theta, phi, g, w, grad_y


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.tensor_split(t, WORLD, dim=2)[rank]


def _record_kernels(seen: list) -> None:
    """Note the kernel of every ring, all-gather or Ulysses block and the backend of every dispatch on this rank."""
    for module in (ring, allgather, ulysses):
        forward = module.attention_forward
        module.attention_forward = lambda q, k, v, scale, kernel, _forward=forward, **options: (
            seen.append(kernel) or _forward(q, k, v, scale, kernel, **options))
    for backend in BACKENDS.values():
        compute = backend.compute
        backend.compute = lambda inputs, _name=backend.name, _compute=compute: seen.append(_name) or _compute(inputs)


def _one_pair(rank: int, strategy: str, backend: str, seen: list):
    mode = _mode(strategy, backend)
    theta, phi, g, w, grad_y = _data(mode)
    scale = 0.3 if mode in ("gaussian", "embedded_gaussian") else None
    shards = [_shard(t, rank).clone().requires_grad_() for t in (theta, phi, g)]
    w_local = None if w is None else w.clone().requires_grad_()
    seen.clear()
    try:
        y = nonlocal_op(*shards, mode, scale=scale, concat_weight=w_local, backend=backend,
                        group=dist.group.WORLD, strategy=strategy)
    except ValueError as exc:
        return {"refused": str(exc)}
    y.backward(_shard(grad_y, rank))
    leaves = [t.clone().requires_grad_() for t in (theta, phi, g, w) if t is not None]
    y_ref = naive_nonlocal(*leaves[:3], mode, scale or 1.0, leaves[3] if w is not None else None)
    y_ref.backward(grad_y)
    errors = {"y": rel_err(y.detach(), _shard(y_ref.detach(), rank))}
    for name, shard, leaf in zip(("dtheta", "dphi", "dg"), shards, leaves):
        errors[name] = rel_err(shard.grad, _shard(leaf.grad, rank))
    if w is not None:
        total = w_local.grad.clone()
        dist.all_reduce(total)
        errors["dconcat_weight"] = rel_err(total, leaves[3].grad)
    return {"errors": errors, "kernels": sorted(set(seen))}


def _every_pair(rank: int, world: int) -> dict:
    seen: list = []
    _record_kernels(seen)
    return {pair: _one_pair(rank, *pair, seen) for pair in PAIRS}


@pytest.fixture(scope="module")
def outcomes() -> list[dict]:
    return run_ranks(_every_pair, WORLD, timeout=300)


@pytest.mark.parametrize("strategy, backend", PAIRS)
def test_strategy_honours_or_refuses_backend(outcomes, strategy, backend):
    expected = HONOURED.get((strategy, backend))
    for rank, per_pair in enumerate(outcomes):
        got = per_pair[(strategy, backend)]
        if expected is None:
            assert "refused" in got, f"rank {rank}: {strategy} ran backend={backend!r} ({got})"
            message = got["refused"]
            assert f"strategy {strategy!r}" in message and f"backend={backend!r}" in message, message
            assert any(phrase in message for phrase in REFUSAL[strategy].split("|")), message
            continue
        assert "refused" not in got, f"rank {rank}: {got['refused']}"
        bad = {name: err for name, err in got["errors"].items() if not err <= 1e-10}
        assert not bad, f"rank {rank}: relative errors {bad}"
        assert got["kernels"] == ([] if expected == "own" else [expected]), f"rank {rank}: ran {got['kernels']}"
