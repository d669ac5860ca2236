"""Random ops in a sharded forward (``sharded.rng``): each shard draws its own values, replicated
values draw alike on every rank whatever each rank seeded, a run is reproducible from the first
rank's seed, checkpointing recomputes the same mask, and the user's generator is given back."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from nonlocal_dist import distribute, parallelize
from nonlocal_dist.sharded import ShardingRefusal
from nonlocal_dist.testing import run_ranks


class _Noisy(nn.Module):
    """Dropout on the sharded clip (inside a checkpoint), noise and dropout on the pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 4))

    def forward(self, x):
        y = checkpoint(self.drop, x, use_reentrant=False)
        pooled = x.mean(dim=(2, 3, 4))
        return y, self.head(pooled + torch.randn_like(pooled))


def _forward(model, x, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y, head = model(x)
    y.sum().backward()
    return y.detach(), head.detach(), x.grad


def _rng_worker(rank, world):
    torch.manual_seed(0)
    model = parallelize(_Noisy(), dist.group.WORLD, "t", sizes=[[4, 4]])
    x = torch.ones(2, 4, 8, 6, 6)
    y, head, grad = _forward(model, x, 100 + rank)  # each rank seeds its own stream
    again = _forward(model, x, 100 + rank)
    torch.manual_seed(5 + rank)
    torch.randint(0, 2**62, (1,))  # the one draw a forward takes from the user's stream (its seed)
    before = torch.rand(3)
    torch.manual_seed(5 + rank)
    model(x)
    after = torch.rand(3)
    xs = distribute(torch.ones(1, 2, 4, 3), dist.group.WORLD, "b c t w", "t")
    with pytest.raises(ShardingRefusal, match="inside a parallelized model"):
        nn.functional.dropout(xs.mean(dim=2, keepdim=True), 0.5)  # replicated, outside a parallelized forward
    with pytest.raises(ShardingRefusal, match="inside a parallelized model"):
        nn.functional.dropout2d(xs, 0.5)  # one mask per sample and channel on every rank: needs agreed generators
    noise = torch.randn_like(xs).to_local()  # sharded outside one: each shard its own draws
    return y, head, grad, again, torch.equal(before, after), noise


def test_dropout_per_shard_alike_where_replicated_reproducible_and_recomputed():
    (y0, head0, grad0, again0, given_back0, noise0), (y1, head1, grad1, again1, given_back1, noise1) = \
        run_ranks(_rng_worker, 2, timeout=120)
    assert torch.equal(y0, y1) and torch.equal(head0, head1)  # the model's outputs: the same on every rank
    kept = y0 / 2  # ones through dropout(0.5): 0 or 2
    assert set(kept.unique().tolist()) == {0.0, 1.0} and abs(kept.mean().item() - 0.5) < 0.05
    assert not torch.equal(kept[:, :, :4], kept[:, :, 4:])  # the two shards drew their own masks
    # The checkpoint recomputed the mask it used: d(sum y)/dx = mask * 2 on each rank's positions, once
    # per rank (every rank backpropagates the gathered y): summed, 2 y.
    assert torch.equal(grad0 + grad1, 2 * y0)
    assert torch.equal(y0, again0[0]) and torch.equal(head0, again0[1])  # the same seeds, the same draws
    assert given_back0 and given_back1
    assert not torch.equal(noise0, noise1)


def _seeded_worker(rank, world, seed):
    torch.manual_seed(0)
    model = parallelize(_Noisy(), dist.group.WORLD, "t", sizes=[[3, 5]])
    return _forward(model, torch.ones(2, 4, 8, 6, 6), seed + 11 * rank)[:2]


def test_a_run_is_reproducible_from_the_first_ranks_seed():
    first = run_ranks(_seeded_worker, 2, 7, timeout=120)
    second = run_ranks(_seeded_worker, 2, 7, timeout=120)
    other = run_ranks(_seeded_worker, 2, 8, timeout=120)
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert not torch.equal(first[0][0], other[0][0])


class _ChannelThenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout3d(0.5)
        self.head = nn.Dropout(0.5)

    def forward(self, x):
        return self.head(self.drop(x).sum(dim=(2, 3, 4)))


def _empty_piece_worker(rank, world):
    torch.manual_seed(rank)
    model = parallelize(_ChannelThenHead(), dist.group.WORLD, "t", sizes=[[5, 0, 3]])
    return model(torch.ones(2, 8, 8, 2, 2))


def test_a_rank_with_an_empty_piece_draws_in_step():
    # Dropout3d on an empty piece draws nothing in torch; the rank must still draw the channel mask,
    # or the head's dropout after it (replicated) would differ on that rank.
    outputs = run_ranks(_empty_piece_worker, 3, timeout=60)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def _int_extreme_worker(rank, world):
    xs = distribute(torch.arange(24).reshape(2, 3, 4), dist.group.WORLD, "b t w", "t", sizes=[[2, 0, 1]])
    out = xs.amax(dim=(1, 2))
    return out.dtype, out.to_local()


def test_integer_extremes_over_an_empty_piece_keep_their_dtype():
    for dtype, values in run_ranks(_int_extreme_worker, 3, timeout=60):
        assert dtype == torch.int64 and values.tolist() == [11, 23]
