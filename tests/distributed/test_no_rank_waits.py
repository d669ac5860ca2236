"""No rank is left waiting: an error on one rank inside a sharded forward reaches every rank.

A rank that raises in user code between two sharded ops never reaches the next collective; the
others must raise ``PeerFailure`` naming it instead of waiting for the process group's timeout.
Refusals (decided from the shard spec) are raised by every rank at the same op, and a plain-looking
(1, 3, 3) convolution on a rank holding no frames is simply exact.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nonlocal_dist import parallelize
from nonlocal_dist.distributed import PeerFailure
from nonlocal_dist.sharded import ShardingRefusal
from nonlocal_dist.testing import run_ranks


class _FailsOnRank(nn.Module):
    """User code that raises on one rank only (a data-dependent check, a bug, a bad file)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, x):
        if dist.get_rank() == self.rank:
            raise RuntimeError("corrupt frame in this rank's shard")
        return x


def _user_error_worker(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), _FailsOnRank(1), nn.Conv3d(4, 4, 3, padding=1),
                          nn.BatchNorm3d(4), nn.AdaptiveAvgPool3d(1))
    parallelize(model, dist.group.WORLD, "t")
    try:
        model(torch.randn(1, 2, 6, 4, 4))
    except Exception as exc:  # noqa: BLE001 - the type is what the test reads
        return type(exc).__name__, str(exc)
    return None, None


def test_one_rank_raising_in_user_code_stops_every_rank():
    results = run_ranks(_user_error_worker, 3, timeout=60)
    assert results[1] == ("RuntimeError", "corrupt frame in this rank's shard")
    for kind, message in (results[0], results[2]):
        assert kind == PeerFailure.__name__ and "rank 1 raised RuntimeError: corrupt frame" in message, message


class _SortFrames(nn.Module):
    def forward(self, x):
        return x.sort(dim=2).values  # an order over the sharded frames: refused


def _refusal_worker(rank, world):
    torch.manual_seed(0)  # the same weights on every rank (parallelize checks them)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), _SortFrames())
    parallelize(model, dist.group.WORLD, "t")
    with pytest.raises(ShardingRefusal, match=r"Tensor.sort along sharded dim 2") as info:
        model(torch.randn(1, 1, 5, 4, 4))
    return str(info.value)


def test_refusal_raised_by_every_rank_at_the_same_op():
    messages = run_ranks(_refusal_worker, 2, timeout=60)
    assert messages[0] == messages[1]


def _empty_shard_worker(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(), nn.Conv3d(3, 3, (3, 1, 1)))
    x = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    want = model(x)
    parallelize(model, dist.group.WORLD, "t", sizes=[[2, 0, 1]])
    return (model(x) - want).abs().max().item()


def test_plain_conv_on_an_empty_shard_is_exact():
    assert max(run_ranks(_empty_shard_worker, 3, timeout=60)) < 1e-6


def _restart_worker(rank, world, port):
    import time
    from datetime import timedelta

    first = _user_error_worker(rank, world)
    # As PeerFailure advises: destroy the group and make a new one (its own store), then run a clean step.
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.AdaptiveAvgPool3d(1))
    parallelize(model, dist.group.WORLD, "t")
    if rank == 2:
        time.sleep(0.5)  # the others wait in a collective, looking for failure notices meanwhile
    return first[0], tuple(model(torch.randn(1, 2, 6, 4, 4, generator=torch.Generator().manual_seed(0))).shape)


def test_a_group_made_again_after_a_peer_failure_starts_clean():
    from nonlocal_dist.testing import free_port

    results = run_ranks(_restart_worker, 3, free_port(), timeout=90)
    assert [kind for kind, _ in results] == [PeerFailure.__name__, "RuntimeError", PeerFailure.__name__]
    assert all(shape == (1, 4, 1, 1, 1) for _, shape in results), results


class _HookRaisesOnRank(nn.Module):
    """A tensor hook that raises in backward on one rank only (a gradient check, a bug)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, x):
        if x.requires_grad:
            x.register_hook(self._check)
        return x

    def _check(self, grad):
        if dist.get_rank() == self.rank:
            raise RuntimeError("non-finite gradient on this rank")
        return grad


def _backward_error_worker(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), _HookRaisesOnRank(1), nn.Conv3d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool3d(1))
    parallelize(model, dist.group.WORLD, "t")
    x = torch.randn(1, 2, 6, 4, 4, requires_grad=True)
    try:
        model(x).sum().backward()
    except Exception as exc:  # noqa: BLE001 - the type is what the test reads
        return type(exc).__name__, str(exc)
    return None, None


def test_one_rank_raising_in_backward_stops_every_rank():
    results = run_ranks(_backward_error_worker, 3, timeout=60, pg_timeout=30)
    assert results[1] == ("RuntimeError", "non-finite gradient on this rank"), results
    for kind, message in (results[0], results[2]):
        assert kind == PeerFailure.__name__ and "rank 1 raised RuntimeError: non-finite gradient" in message, message


def _checkpoint_worker(rank, world):
    import time

    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1))
    model = nn.Sequential(nn.Identity(), nn.AdaptiveAvgPool3d(1))

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = body, model

        def forward(self, x):  # non-reentrant: recomputation stops early (torch's internal exception)
            return self.head(checkpoint(self.body, x, use_reentrant=False))

    net = parallelize(Checkpointed(), dist.group.WORLD, "t")
    x = torch.randn(1, 2, 6, 4, 4)
    for step in range(2):
        if rank == 1 and step == 1:
            time.sleep(0.5)  # a late rank: the others wait in a collective, looking for notices
        net(x).sum().backward()
    return True


def test_checkpoint_recomputation_is_not_a_failure():
    assert run_ranks(_checkpoint_worker, 2, timeout=60) == [True, True]
