"""halo_exchange on real gloo ranks: each rank's window of the global tensor, and the halos' gradients
sent back and added, for uneven shards and halos wider than a shard."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nonlocal_dist.sharded.halo import halo_exchange, halo_plan
from nonlocal_dist.testing import run_ranks

# (shard lengths, before, after, fill): 1-3 ranks, uneven, halos wider than a shard, empty shards.
CASES = {
    1: [([5], 2, 1, (2, 1))],
    2: [([4, 3], 1, 1, (1, 1)), ([1, 6], 3, 2, (0, 0)), ([5, 2], 0, 4, (0, 2))],
    3: [([3, 1, 4], 2, 2, (2, 2)), ([2, 2, 2], 5, 5, (0, 0)), ([4, 0, 3], 1, 1, (1, 1)), ([1, 1, 5], 0, 3, (0, 0))],
}


def test_plan_spans_several_ranks():
    plan = halo_plan([3, 1, 4], rank=2, before=3, after=1)  # window [1, 8): 2 from rank 0, 1 from rank 1
    assert plan.recv == (2, 1, 0) and plan.before == 3 and plan.after == 0
    # rank 1 reads [0, 5): all of rank 0; rank 2 reads [1, 8): rank 0's last two
    assert halo_plan([3, 1, 4], rank=0, before=3, after=1).send == ((0, 0), (0, 3), (1, 2))
    with pytest.raises(ValueError, match=">= 0"):
        halo_plan([2, 2], 0, -1, 0)


def _expected_window(full, sizes, rank, before, after, fill, value):
    start = sum(sizes[:rank])
    lo, hi = max(0, start - before), min(full.shape[2], start + sizes[rank] + after)
    shape = list(full.shape)
    pads = []
    for n in fill:
        shape[2] = n
        pads.append(torch.full(shape, value, dtype=full.dtype))
    return torch.cat([pads[0], full[:, :, lo:hi], pads[1]], dim=2), lo, hi


def _worker(rank, world):
    errors = []
    for index, (sizes, before, after, fill) in enumerate(CASES[world]):
        gen = torch.Generator().manual_seed(index)
        full = torch.randn(2, 3, sum(sizes), 4, generator=gen, dtype=torch.float64)
        weights = [torch.randn(2, 3, fill[0] + hi - lo + fill[1], 4, generator=gen, dtype=torch.float64)
                   for lo, hi in (_expected_window(full, sizes, r, before, after, fill, 0.0)[1:] for r in range(world))]
        x = full.split(sizes, dim=2)[rank].clone().requires_grad_()
        out = halo_exchange(x, 2, before, after, sizes, dist.group.WORLD, fill, value=-7.0)
        want, _, _ = _expected_window(full, sizes, rank, before, after, fill, -7.0)
        if not torch.equal(out, want):
            errors.append(f"case {index}: window differs")
        (out * weights[rank]).sum().backward()
        grad = torch.zeros_like(full)  # d/dx of Σ_r <window_r, weights_r>: every rank's weights on the positions it read
        for r in range(world):
            _, lo, hi = _expected_window(full, sizes, r, before, after, fill, 0.0)
            grad[:, :, lo:hi] += weights[r][:, :, fill[0] : fill[0] + hi - lo]
        if not torch.allclose(x.grad, grad.split(sizes, dim=2)[rank], rtol=0, atol=1e-12):
            errors.append(f"case {index}: gradient differs")
    return errors


@pytest.mark.parametrize("world", [1, 2, 3])
def test_halo_exchange_matches_global_windows(world):
    for errors in run_ranks(_worker, world):
        assert not errors, errors
