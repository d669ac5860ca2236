"""Frames folded into the batch by a view (``x.view(b * t, ...)`` with t sharded and b > 1): a strided
shard (``spec.Strided``). Unchanged model code on 1-3 gloo ranks with uneven and empty shards, float64,
against one process: outputs, input gradients and summed parameter gradients.

- Sana-Video's GLUMBTempConv, as diffusers writes it: per-frame 2-D convs and a gated split on the
  folded frames, a view back to ``(b, t, ...)`` and a temporal conv: exact, with no exchange at all;
- ops that need to know where the folded rows are (a slice, a pad, a join along them; a mean and
  a max over them need not): the folded operand is regrouped into whole samples per rank (logged,
  once per call site with its bytes) and the op is exact;
- an in-place write through the folded view reaches the tensor it was taken from (an alias, as in
  torch); one that needs the rows' positions, or writes into a slice of them (a view of a regrouped
  copy), is refused on every rank.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sharded_parity import module_parity, runtime_log, sharded_run
from torch import nn

from nonlocal_dist.sharded import ShardingRefusal, local_map
from nonlocal_dist.testing import run_ranks

SIZES = {1: [[7]], 2: [[5, 2]], 3: [[1, 6, 0]]}


class TempConvBlock(nn.Module):
    """Sana-Video's GLUMBTempConv forward (x: b t h w c), then per-frame attention over each frame's
    tokens folded into the batch by a view."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv_inverted = nn.Conv2d(c, 4 * c, 1)
        self.conv_depth = nn.Conv2d(4 * c, 4 * c, 3, 1, 1, groups=4 * c)
        self.conv_point = nn.Conv2d(2 * c, c, 1, bias=False)
        self.norm = nn.GroupNorm(2, c)
        self.conv_temp = nn.Conv2d(c, c, kernel_size=(3, 1), padding=(1, 0), bias=False)
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):
        b, t, h, w, c = x.shape
        y = x.view(b * t, h, w, c).permute(0, 3, 1, 2)
        y = F.silu(self.conv_inverted(y))
        y, gate = torch.chunk(self.conv_depth(y), 2, dim=1)
        y = self.norm(self.conv_point(y * F.silu(gate)))
        temporal = y.view(b, t, c, h * w).permute(0, 2, 1, 3)
        y = temporal + self.conv_temp(temporal)
        y = y.permute(0, 2, 3, 1).view(b, t, h, w, c) + x
        q, k, v = self.qkv(y).view(b * t, h * w, 3, c).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v)
        return y + a.reshape(b, t, h, w, c)


class NeedsPositions(nn.Module):
    """Ops along the folded frames that need to know where each rank's rows are."""

    def forward(self, x):
        b, t, h, w, c = x.shape
        f = x.view(b * t, h, w, c)
        padded = F.pad(f, (0, 0, 0, 0, 0, 0, 1, 0))[:-1]
        joined = torch.cat([f[:1], f], 0)[1:]
        y = f[1:] * 2 + padded[1:] + joined[:-1] + f.mean(0) + f.amax(0)
        return y.view(b * t - 1, h * w * c)


class WritesThroughTheView(nn.Module):
    """``x.view(b * t, ...).mul_(...)`` changes x (an alias): x is returned."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        b, t, h, w, c = x.shape
        x = x * 1.0
        x.view(b * t, h, w, c).mul_(self.scale)
        return x


class ChannelsOfFoldedFrames(nn.Module):
    """Slices and writes along the channels of folded frames need no positions: no regroup, and a slice
    taken before an in-place op on x sees it (a view of x, as in torch); an einsum and a position-wise
    ``local_map`` meet folded frames beside frames folded by a reshape (contiguous: regrouped)."""

    def forward(self, x):
        b, t, h, w, c = x.shape
        x = x * 1.0
        f = x.view(b * t, h, w, c)
        first = f[..., :2]
        x.add_(1.0)
        f[..., 0] = 0.0
        moved = x.reshape(b * t, h, w, c)  # the shard moved to b: a contiguous split of the same dim
        mixed = torch.einsum("nhwc,nhwc->nhw", f, moved)[..., None]
        return (first * 2 + mixed + add_frames(f, moved)).view(b, t, h, w, 2)[..., :1].expand(b, t, h, w, c)


@local_map
def add_frames(a, b):
    return (a + b)[..., :2]


CASES = {"temp_conv_block": TempConvBlock, "needs_positions": NeedsPositions,
         "writes_through_the_view": WritesThroughTheView, "channels_of_folded_frames": ChannelsOfFoldedFrames}


def _worker(rank, world, name):
    import torch.distributed as dist

    return module_parity(CASES[name], (2, 7, 3, 2, 4), dist.group.WORLD, "t", layout="b t h w c", sizes=SIZES[world])


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_frames_folded_into_the_batch_by_a_view_are_exact(name, world):
    assert run_ranks(_worker, world, name, timeout=120) == [True] * world


def _logged_worker(rank, world, name):
    import torch.distributed as dist

    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 2, 4, dtype=torch.float64)
    with runtime_log() as messages:
        sharded_run({**CASES, "slices_frames": SlicesFrames}[name]().double(), x, dist.group.WORLD, "t", layout="b t h w c", sizes=SIZES[world])
    return messages


def test_per_frame_layers_on_folded_frames_exchange_nothing():
    """Only the temporal conv's halo moves positions: no regroup, no shard moved, nothing gathered."""
    for messages in run_ranks(_logged_worker, 2, "temp_conv_block", timeout=120):
        assert not any("regrouped" in m or "moved" in m or "gathered" in m for m in messages), messages


class SlicesFrames(nn.Module):
    """A slice along the folded frames, on lines of its own (each call site logs once per process)."""

    def forward(self, x):
        b, t, h, w, c = x.shape
        return x.view(b * t, h, w, c)[1:] * 2


def test_an_op_needing_the_folded_positions_regroups_once_per_call_site():
    for messages in run_ranks(_logged_worker, 2, "slices_frames", timeout=120):
        assert len(messages) == 1, messages
        assert "regrouped to whole blocks [1, 1]" in messages[0] and "bytes" in messages[0], messages
        assert "test_folded.py" in messages[0], messages


class WritesRowsInPlace(nn.Module):
    def forward(self, x):
        b, t, h, w, c = x.shape
        x = x * 1.0
        x.view(b * t, h, w, c)[1:] += 1.0
        return x


class WritesAroundASlice(nn.Module):
    """A slice along the folded frames is a view of a regrouped copy: a write into it would not reach x
    (``into="slice"``), and a later write into x would not reach it (``into="tensor"``); torch's slice,
    a view of x, would see both."""

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    def forward(self, x):
        b, t, h, w, c = x.shape
        x = x * 1.0
        later = x.view(b * t, h, w, c)[1:]
        (later if self.into == "slice" else x).mul_(2.0)
        return x if self.into == "slice" else later


def _refused_worker(rank, world, name):
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    module = WritesRowsInPlace() if name == "rows" else WritesAroundASlice("slice" if name == "slice" else "tensor")
    model = parallelize(module, dist.group.WORLD, "t", layout="b t h w c", sizes=SIZES[world])
    try:
        model(torch.randn(2, 7, 3, 2, 4))
    except ShardingRefusal as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", ["rows", "slice", "stale"])
def test_an_in_place_write_that_would_miss_the_folded_tensor_is_refused_on_every_rank(name):
    messages = run_ranks(_refused_worker, 2, name, timeout=120)
    assert all(m is not None and "folded by a view" in m and "test_folded.py" in m for m in messages), messages
