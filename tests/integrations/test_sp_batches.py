"""shard_batch / gather_predictions over DeepSpeed's SP groups (world 4 = 2 SP groups of 2 ranks)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nonlocal_dist.testing import run_ranks

pytest.importorskip("deepspeed")


def _worker(rank, world, sp_size):
    from nonlocal_dist.integrations.deepspeed_sp import gather_predictions, init_sequence_parallel, shard_batch

    sp = init_sequence_parallel(sp_size)
    # Each SP group (data-parallel rank) has its own clips; 5 frames do not divide by 2.
    clips = torch.arange(2 * 3 * 5 * 2 * 2, dtype=torch.float32).view(2, 3, 5, 2, 2) + 1000 * sp.dp_rank
    local = shard_batch(clips, sp)
    per_frame = local.mean(dim=(1, 3, 4))  # (B, T_r) "predictions" along the sharded axis
    gathered = gather_predictions(per_frame, sp, layout="b t", axis="t")
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    local = local.to_local() if sp_size > 1 else local
    dist.all_gather(sizes, torch.tensor([local.shape[2]]))
    return {
        "frames": [int(s) for s in sizes],
        "local_matches": torch.equal(local, torch.tensor_split(clips, sp_size, dim=2)[sp.sp_rank]),
        "gathered_matches": torch.equal(gathered, clips.mean(dim=(1, 3, 4))),
    }


@pytest.mark.parametrize("sp_size, frames", [(2, [3, 2, 3, 2]), (1, [5, 5, 5, 5])])
def test_shard_batch_and_gather_predictions_invert_each_other(sp_size, frames):
    results = run_ranks(_worker, 4, sp_size)
    assert results[0]["frames"] == frames
    assert all(r["local_matches"] and r["gathered_matches"] for r in results)
