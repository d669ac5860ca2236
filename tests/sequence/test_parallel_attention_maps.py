"""affinity_rows of a sharded NonLocalBlock on real gloo ranks equals the single-process rows."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import rel_err

from nonlocal_dist import MODES, NonLocalBlock
from nonlocal_dist.attention_maps import affinity_rows
from nonlocal_dist.sequence import shard_tensor
from nonlocal_dist.testing import run_ranks

# (shard_axis, sub_sample, shape, queries (t, h, w)): t = 7 gives shards 4+3 and 3+2+2; h = 5 gives 3+2 and 2+2+1.
CONFIGS = [
    ("t", {"h": 2, "w": 2}, (2, 8, 7, 6, 4), [(0, 0, 0), (6, 5, 3), (3, 2, 1), (4, 1, 2)]),
    ("h", {"t": 2, "w": 2}, (1, 8, 4, 5, 4), [(3, 4, 3), (0, 0, 0), (2, 2, 1)]),
]


def _rows_case(rank, world):
    failures = []
    group = dist.group.WORLD
    for mode in MODES:
        for index, (shard_axis, sub_sample, shape, queries) in enumerate(CONFIGS):
            torch.manual_seed(20 + index)
            whole = NonLocalBlock(8, mode=mode, sub_sample=sub_sample, heads=2, use_scale=True).double()
            with torch.no_grad():
                for p in whole.parameters():
                    p.copy_(torch.randn_like(p) * 0.5)
            sharded = NonLocalBlock(8, mode=mode, sub_sample=sub_sample, heads=2, use_scale=True, sp_group=group,
                                    shard_axis=shard_axis).double()
            sharded.load_state_dict(whole.state_dict())
            x = torch.randn(*shape, dtype=torch.float64)
            want = affinity_rows(whole, x, queries)
            got = affinity_rows(sharded, shard_tensor(x, "b c t h w", shard_axis, group), queries)
            err = rel_err(got, want) if got.shape == want.shape else float("inf")
            if not err <= 1e-12:
                failures.append(f"{mode} config {index}: shapes {tuple(got.shape)} vs {tuple(want.shape)}, rel err {err:.2e}")
    return failures


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_rows_equal_single_process_rows_on_every_rank(world):
    failures = run_ranks(_rows_case, world, timeout=120)
    assert not any(failures), failures


def _errors_case(rank, world):
    group = dist.group.WORLD
    block = NonLocalBlock(4, sub_sample={"h": 2}, sp_group=group, shard_axis="t")
    x = shard_tensor(torch.randn(1, 4, 5, 4, 3), "b c t h w", "t", group)  # 5 frames: 3 + 2
    messages = []
    for queries in ([(5, 0, 0)],  # t = 5 is past the global 5 frames, though rank 0 holds only 3
                    [(0, 0, 0)] if rank == 0 else [(1, 0, 0)],  # ranks disagree
                    [(0, 0)] if rank == 1 else [(0, 0, 0)]):  # one rank's queries are malformed
        try:
            affinity_rows(block, x, queries)
            messages.append("no error")
        except (ValueError, TypeError) as exc:
            messages.append(str(exc))
    return messages


def test_bad_queries_raise_on_every_rank():
    for rank, (out_of_range, disagree, malformed) in enumerate(run_ranks(_errors_case, 2, timeout=60)):
        assert "index 5 on axis 't' is outside 0..4" in out_of_range and "every rank of the group" in out_of_range
        assert "queries per rank = [((0, 0, 0),), ((1, 0, 0),)]" in disagree, disagree
        if rank == 1:
            assert "expected 3 indices" in malformed, malformed
        else:
            assert "rank(s) [1]" in malformed and "expected 3 indices" in malformed, malformed
