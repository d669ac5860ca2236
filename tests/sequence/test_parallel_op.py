"""nonlocal_op(group=) on real gloo ranks: output and every gradient per shard vs a float64 oracle."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import rel_err
from oracle import naive_nonlocal

from nonlocal_dist import nonlocal_op
from nonlocal_dist.sequence import MODE_STRATEGIES, ring
from nonlocal_dist.testing import run_ranks

# (B, H, N, M, d, dv): uneven shards (N, M not divisible by the world size), N != M, batch and heads > 1.
CASES = [(2, 2, 13, 10, 8, 5), (1, 4, 17, 17, 6, 6), (3, 1, 7, 11, 4, 9)]


def _split(t, world, dim):
    return list(torch.tensor_split(t, world, dim=dim))


def _case(rank, world, mode, ring_chunk=None):
    if ring_chunk is not None:  # many query and key chunks per ring step, of uneven sizes
        ring.preferred_chunk = lambda device: ring_chunk
    failures = []
    for case_index, (b, h, n, m, d, dv) in enumerate(CASES):
        gen = torch.Generator().manual_seed(100 + case_index)
        theta = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
        phi = torch.randn(b, h, m, d, generator=gen, dtype=torch.float64)
        g = torch.randn(b, h, m, dv, generator=gen, dtype=torch.float64)
        w = torch.randn(h, 2 * d, generator=gen, dtype=torch.float64) if case_index == 1 else torch.randn(2 * d, generator=gen, dtype=torch.float64)
        grad_y = torch.randn(b, h, n, dv, generator=gen, dtype=torch.float64)
        cw = w if mode == "concatenation" else None
        scale = 0.3 if mode in ("gaussian", "embedded_gaussian") else None
        leaves = [t.clone().requires_grad_() for t in (theta, phi, g, w)]
        y_ref = naive_nonlocal(*leaves[:3], mode, scale or 1.0, leaves[3] if cw is not None else None)
        y_ref.backward(grad_y)
        for strategy in MODE_STRATEGIES[mode]:
            if strategy == "ulysses" and h % world:
                continue
            shards = [_split(t, world, 2)[rank].float().requires_grad_() for t in (theta, phi, g)]
            w32 = w.float().requires_grad_()
            y = nonlocal_op(*shards, mode, scale=scale, concat_weight=w32 if cw is not None else None,
                            group=dist.group.WORLD, strategy=strategy)
            y.backward(_split(grad_y, world, 2)[rank].float())
            checks = {"y": (y, _split(y_ref, world, 2)[rank])}
            for name, shard, leaf in zip(("theta", "phi", "g"), shards, leaves):
                checks[f"d{name}"] = (shard.grad, _split(leaf.grad, world, 2)[rank])
            if cw is not None:
                total = w32.grad.clone()
                dist.all_reduce(total)
                checks["dconcat_weight (sum over ranks)"] = (total, leaves[3].grad)
            for name, (got, want) in checks.items():
                err = rel_err(got, want)
                if not err <= 1e-5:
                    failures.append(f"case {case_index} strategy {strategy}: {name} rel err {err:.2e}")
    return failures


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_parallel_matches_single_device_float64(world, mode):
    failures = run_ranks(_case, world, mode)
    assert not any(failures), failures


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian"])
def test_ring_backward_in_chunks(world, mode):
    failures = run_ranks(_case, world, mode, 2)
    assert not any(failures), failures


def _mismatch(rank, world, kind):
    theta = torch.randn(2, 5, 8)
    phi, g = torch.randn(2, 4, 8), torch.randn(2, 4, 6)
    kwargs = {"group": dist.group.WORLD}
    if kind == "dtype" and rank == 1:
        theta, phi, g = theta.double(), phi.double(), g.double()
    if kind == "mode":
        kwargs["mode"] = "dot_product" if rank == 0 else "embedded_gaussian"
    if kind == "channels" and rank == 1:
        theta, phi = torch.randn(2, 5, 4), torch.randn(2, 4, 4)
    if kind == "invalid" and rank == 0:
        g = torch.randn(2, 3, 6)  # M differs from phi on this rank only
    if kind == "strategy":
        kwargs["strategy"] = "ring" if rank == 0 else "allgather"
    try:
        nonlocal_op(theta, phi, g, **kwargs)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("kind,match", [
    ("dtype", "dtype per rank"), ("mode", "mode per rank"), ("channels", "d per rank"),
    ("invalid", "same number of key positions|rejected their inputs"), ("strategy", "strategy per rank"),
])
def test_mismatch_raises_on_every_rank(kind, match):
    import re

    messages = run_ranks(_mismatch, 2, kind, timeout=60)
    for rank, message in enumerate(messages):
        assert re.search(match, message), f"rank {rank}: {message}"


def test_default_strategy_is_the_lowest_memory_one():
    from nonlocal_dist.sequence.strategies import default_strategy

    assert [default_strategy(m) for m in MODE_STRATEGIES] == ["ring", "ring", "allreduce", "sorted_stats"]


def test_a_small_key_set_defaults_to_the_all_gather():
    """Where every rank's keys are known (a spec) and small, the softmax modes gather them in one
    collective instead of P - 1 latency-bound ring steps; the other modes keep theirs."""
    from nonlocal_dist.sequence.strategies import SMALL_KEYS_BYTES, default_strategy

    small = [default_strategy(m, SMALL_KEYS_BYTES) for m in MODE_STRATEGIES]
    assert small == ["allgather", "allgather", "allreduce", "sorted_stats"]
    assert [default_strategy(m, SMALL_KEYS_BYTES + 1) for m in MODE_STRATEGIES] == ["ring", "ring", "allreduce",
                                                                                    "sorted_stats"]


def _default_on_two_ranks(rank, world):
    # The ring's kernel calls (ring.attention_forward) show which strategy strategy=None ran.
    calls = []
    inner = ring.attention_forward
    ring.attention_forward = lambda *args: calls.append(1) or inner(*args)
    x = torch.randn(1, 6 + rank, 4, generator=torch.Generator().manual_seed(rank))
    nonlocal_op(x, x, x, group=dist.group.WORLD)
    return len(calls)


def test_two_ranks_default_to_the_ring():
    assert run_ranks(_default_on_two_ranks, 2, timeout=60) == [2, 2]
