"""A rank of the sequence-parallel group holding zero positions (3 gloo ranks, e.g. a clip of 2 frames):
every strategy and mode, and the block, exact against the float64 single-process reference."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from block_parity import sharded_block_failures
from helpers import rel_err
from oracle import naive_nonlocal

from nonlocal_dist import nonlocal_op
from nonlocal_dist.sequence import MODE_STRATEGIES, shard_tensor
from nonlocal_dist.testing import run_ranks

# Query and key positions per rank: the last rank empty (2 positions over 3 ranks), an empty rank
# in the middle, and empty query and key shards on different ranks (sub-sampled keys).
SIZES = [([1, 1, 0], [1, 1, 0]), ([2, 0, 3], [3, 0, 1]), ([2, 0, 3], [0, 4, 1])]
B, H, D, DV = 2, 3, 4, 5  # H = 3: ulysses needs heads divisible by the 3 ranks


def _err(got, want):
    return 0.0 if want.numel() == 0 else rel_err(got, want)


def _case(rank, world, mode):
    failures = []
    for case_index, (n_sizes, m_sizes) in enumerate(SIZES):
        gen = torch.Generator().manual_seed(case_index)
        n, m = sum(n_sizes), sum(m_sizes)
        theta, phi = torch.randn(B, H, n, D, generator=gen, dtype=torch.float64), torch.randn(B, H, m, D, generator=gen, dtype=torch.float64)
        g, grad_y = torch.randn(B, H, m, DV, generator=gen, dtype=torch.float64), torch.randn(B, H, n, DV, generator=gen, dtype=torch.float64)
        w = torch.randn(2 * D, generator=gen, dtype=torch.float64)
        cw = w if mode == "concatenation" else None
        scale = 0.3 if mode in ("gaussian", "embedded_gaussian") else None
        leaves = [t.clone().requires_grad_() for t in (theta, phi, g, w)]
        y_ref = naive_nonlocal(*leaves[:3], mode, scale or 1.0, leaves[3] if cw is not None else None)
        y_ref.backward(grad_y)

        def mine(t, sizes):
            return t.split(sizes, dim=2)[rank]

        for strategy in MODE_STRATEGIES[mode]:
            shards = [mine(t, s).requires_grad_() for t, s in ((theta, n_sizes), (phi, m_sizes), (g, m_sizes))]
            w_local = w.clone().requires_grad_()
            y = nonlocal_op(*shards, mode, scale=scale, concat_weight=w_local if cw is not None else None,
                            group=dist.group.WORLD, strategy=strategy)
            y.backward(mine(grad_y, n_sizes))
            checks = {"y": (y, mine(y_ref, n_sizes))}
            for name, shard, leaf, sizes in zip(("theta", "phi", "g"), shards, leaves, (n_sizes, m_sizes, m_sizes)):
                checks[f"d{name}"] = (shard.grad, mine(leaf.grad, sizes))
            if cw is not None:
                total = w_local.grad.clone()
                dist.all_reduce(total)
                checks["dconcat_weight (sum over ranks)"] = (total, leaves[3].grad)
            for name, (got, want) in checks.items():
                if got is None or got.shape != want.shape or not _err(got, want) <= 1e-12:
                    failures.append(f"sizes {n_sizes}/{m_sizes} {strategy}: {name} "
                                    f"{'missing' if got is None else (tuple(got.shape), _err(got, want))}")
    return failures


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_empty_shard_every_strategy(mode):
    failures = run_ranks(_case, 3, mode, timeout=180)
    assert not any(failures), failures


def _all_empty(rank, world, which):
    theta, phi, g = torch.randn(1, 2, 0 if which == "queries" else 1, 3), torch.randn(1, 2, 0, 3), torch.randn(1, 2, 0, 3)
    if which == "queries":
        phi, g = torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3)
    try:
        nonlocal_op(theta, phi, g, "embedded_gaussian", group=dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("which", ["queries", "keys"])
def test_group_without_any_positions_raises_on_every_rank(which):
    for message in run_ranks(_all_empty, 2, which, timeout=60):
        assert f"holds no {which[:-1] if which == 'keys' else 'query'}" in message


def _shard(rank, world):
    x = torch.arange(2 * 5).reshape(2, 5)
    shard = shard_tensor(x, "t c", "t", dist.group.WORLD).tolist()
    dist.barrier()  # rank 0 hosts the rendezvous store: no rank leaves before all have joined
    return shard


def test_shard_tensor_fewer_positions_than_ranks():
    assert run_ranks(_shard, 3, timeout=60) == [[list(range(5))], [list(range(5, 10))], []]


BLOCK_CONFIGS = [("t", None, (2, 8, 2, 5, 4)), ("t", {"h": 2, "w": 2}, (2, 8, 2, 5, 4)), ("h", {"w": 2}, (1, 8, 3, 2, 4))]


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_block_with_an_empty_shard(mode):
    failures = run_ranks(sharded_block_failures, 3, mode, BLOCK_CONFIGS, 0, timeout=240)
    assert not any(failures), failures
