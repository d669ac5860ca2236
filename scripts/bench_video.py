"""Video suite: an I3D-style network with non-local blocks, fwd+bwd on one clip, sharded over time by
``nonlocal_dist.parallelize`` on gloo ranks (1 thread each) next to the unchanged model in one process.

Measured in one run: peak memory per rank (torch's allocator) at each world size against the
single-process model, and time on ``--time-world`` ranks x 1 thread against one process with that
many threads. Run through ``python scripts/benchmark.py --suite parallel [--parallel-parts video] [--video-clip 1 3 64 112 112]``
or ``python scripts/bench_video.py``.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from bench_utils import best_time, peak_memory_mb, print_table, spawn_ranks
from nonlocal_dist import parallelize
from nonlocal_dist.models import I3DNonLocal
from nonlocal_dist.parallel import shard_tensor


def _model(args) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    model = I3DNonLocal(args.clip[1], args.classes, stem_channels=args.stem, widths=tuple(args.widths))
    return model.train()


def _step(model, x, world: int, group):
    def run():
        model.zero_grad(set_to_none=True)
        (model(x).sum() / world).backward()  # the project's convention: each rank's loss / group size
        if group is not None:
            dist.barrier(group)
    return run


def _clip(args) -> torch.Tensor:
    return torch.randn(*args.clip, generator=torch.Generator().manual_seed(1))


def _rank_main(rank, world, args, group) -> tuple[float, float]:
    model = parallelize(_model(args), group, "t")
    run = _step(model, shard_tensor(_clip(args), "b c t h w", "t", group), world, group)
    return best_time(run, args.repeats), peak_memory_mb(run)


def _run_world(world: int, args) -> tuple[float, float]:
    """(slowest rank's fwd+bwd seconds, largest rank's peak MiB) on ``world`` ranks."""
    results = spawn_ranks(_rank_main, world, args, timeout_min=120).values()
    return max(t for t, _ in results), max(mem for _, mem in results)


def _single_process(args, threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    run = _step(_model(args), _clip(args), 1, None)
    return best_time(run, args.repeats), peak_memory_mb(run)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clip", type=int, nargs=5, default=[1, 3, 64, 112, 112], metavar=("B", "C", "T", "H", "W"))
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128], help="I3D stage widths")
    parser.add_argument("--stem", type=int, default=16, help="stem channels")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="ranks (1 thread each)")
    parser.add_argument("--time-world", type=int, default=2, help="ranks compared with one process of as many threads")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    base_t, base_mem = _single_process(args, 1)
    threaded_t, _ = _single_process(args, args.time_world)
    rows = [["1 process, 1 thread", 1e3 * base_t, base_mem, "1.00x", "-"],
            [f"1 process, {args.time_world} threads", 1e3 * threaded_t, "-", "-", "1.00x"]]
    records = [{"suite": "video", "ranks": 1, "threads": 1, "clip": args.clip, "fwd_bwd_ms": 1e3 * base_t,
                "peak_mb_per_rank": base_mem},
               {"suite": "video", "ranks": 1, "threads": args.time_world, "clip": args.clip, "fwd_bwd_ms": 1e3 * threaded_t}]
    for world in args.worlds:
        t, mem = _run_world(world, args)
        vs_threads = f"{t / threaded_t:.2f}x" if world == args.time_world else "-"
        rows.append([f"{world} ranks x 1 thread", 1e3 * t, mem, f"{mem / base_mem:.2f}x", vs_threads])
        records.append({"suite": "video", "ranks": world, "threads": 1, "clip": args.clip, "fwd_bwd_ms": 1e3 * t,
                        "peak_mb_per_rank": mem, "memory_vs_one_process": mem / base_mem})
    print_table(
        f"I3D-style network with non-local blocks (widths {args.widths}), clip {tuple(args.clip)}, float32, fwd+bwd, "
        "parallelize(model, group, 't') on gloo",
        ["run", "fwd+bwd ms (slowest rank)", "peak MiB per rank", "memory vs 1 process",
         f"time vs 1 process x {args.time_world} threads"],
        rows,
    )
    return records


if __name__ == "__main__":
    main()
