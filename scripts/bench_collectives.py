"""Gloo's reduce-scatter against this package's (``comm.reduce_scatter_parts``: one all-to-all and a
local sum), on P CPU ranks of 1 thread, float32, even shards along the outer dim.

Columns: the shard's size, the median wall time of each over ``--repeats`` calls (the slowest rank),
and the ratio ours / gloo's. Both results are checked equal before timing.

    python scripts/bench_collectives.py [--world 2 3] [--repeats 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from bench_utils import print_table, spawn_ranks

SHARD_KIB = (24, 96, 384, 1536)


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    dist.barrier()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _ranks(rank, world, args, group) -> dict:
    from nonlocal_dist.distributed.comm import reduce_scatter_parts

    torch.manual_seed(rank)
    results = {}
    for kib in SHARD_KIB:
        n = kib * 256
        x = torch.randn(world * n)
        out = torch.empty(n)
        dist.reduce_scatter_tensor(out, x, group=group)
        ours = reduce_scatter_parts([x], [n] * world, 0, group)[0]
        if not torch.allclose(out, ours, rtol=1e-6, atol=1e-5):
            raise AssertionError(f"reduce_scatter_parts differs from gloo's reduce-scatter at {kib} KiB")
        gloo = _median_ms(lambda: dist.reduce_scatter_tensor(out, x, group=group), args.repeats)
        mine = _median_ms(lambda: reduce_scatter_parts([x], [n] * world, 0, group), args.repeats)
        results[kib] = (gloo, mine)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, nargs="+", default=[2, 3], help="group sizes P")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per case (the median taken)")
    args = p.parse_args(argv)
    rows = []
    for world in args.world:
        ranks = spawn_ranks(_ranks, world, args)
        for kib in SHARD_KIB:
            gloo = max(r[kib][0] for r in ranks.values())
            mine = max(r[kib][1] for r in ranks.values())
            rows.append([world, kib, gloo, mine, mine / gloo])
    print_table("Reduce-scatter on gloo CPU ranks (1 thread each), float32",
                ["P", "shard KiB", "gloo reduce_scatter (ms)", "all-to-all + sum (ms)", "ours / gloo"], rows)


if __name__ == "__main__":
    main()
