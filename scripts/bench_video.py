"""Video suite: an I3D-style network with non-local blocks, fwd+bwd on one clip, sharded over time by
``nonlocal_dist.parallelize`` on gloo ranks (1 thread each) next to the unchanged model in one process.

Measured in one run, per clip (default 64x112x112 and the paper's 64x224x224): peak memory per rank
(torch's allocator) at each world size against the single-process model, time on ``--time-world``
ranks x 1 thread against one process with that many threads, and the collectives each rank issues
per step; then what one collective costs between compute slices on this machine (``sync_cost``).
Run through ``python scripts/benchmark.py --suite parallel [--parallel-parts video] [--video-clip B C T H W ...]``
or ``python scripts/bench_video.py [--clip B C T H W ...]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from bench_utils import best_time, peak_memory_mb, print_table, spawn_ranks

from nonlocal_dist import parallelize
from nonlocal_dist.models import I3DNonLocal


def _model(args) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    model = I3DNonLocal(args.clip[1], args.classes, stem_channels=args.stem, widths=tuple(args.widths))
    return model.train()


def _step(model, x, world: int, group):
    def run():
        model.zero_grad(set_to_none=True)
        (model(x).sum() / world).backward()  # the project's convention: each rank's loss / group size
        if group is not None and dist.get_world_size(group) > 1:  # ranks aligned for the next step's timing
            dist.barrier(group)
    return run


def _clip(args) -> torch.Tensor:
    return torch.randn(*args.clip, generator=torch.Generator().manual_seed(1))


_COLLECTIVES = ("all_gather", "all_reduce", "all_to_all_single", "batch_isend_irecv", "all_gather_into_tensor",
                "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single", "broadcast")


def _count_collectives(run) -> int:
    """Collectives one call of ``run`` issues on this rank (each a synchronisation point of the group)."""
    import importlib

    count = [0]
    targets = [(dist, name) for name in _COLLECTIVES if hasattr(dist, name)]
    for module in ("nonlocal_dist.distributed.comm", "nonlocal_dist.parallel.comm"):  # the baseline's: parallel
        try:  # the one-tensor gather and reduce-scatter, bound in the package's comm module at import
            comm = importlib.import_module(module)
        except ImportError:
            continue
        targets += [(comm, name) for name in ("_all_gather", "_reduce_scatter") if hasattr(comm, name)]
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def counted(fn):
        def call(*a, **k):
            count[0] += 1
            return fn(*a, **k)
        return call

    for owner, name, fn in originals:
        setattr(owner, name, counted(fn))
    try:
        run()
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    return count[0]  # the step's closing dist.barrier is not among them


def _sharded_input(clip: torch.Tensor, group):
    """The clip as this package takes it: a ShardedTensor; before the redesign (``--baseline``), the
    class-swapped model took this rank's plain slice (``shard_tensor``)."""
    try:
        from nonlocal_dist.sharded import distribute
    except ImportError:  # a baseline from before the package split
        import nonlocal_dist.parallel as parallel

        if not hasattr(parallel, "distribute"):
            return parallel.shard_tensor(clip, "b c t h w", "t", group)
        distribute = parallel.distribute
    return distribute(clip, group, "b c t h w", "t")


def _rank_main(rank, world, args, group) -> tuple[float, float, int]:
    model = parallelize(_model(args), group, "t")
    run = _step(model, _sharded_input(_clip(args), group), world, group)
    return best_time(run, args.repeats), peak_memory_mb(run), _count_collectives(run)


def _dispatch_rank(rank, world, args, group) -> list[float]:
    """On a group of one: the parallelized model's step over the unchanged model's, both in this
    process, alternated over ``args.rounds`` rounds (each the best of ``args.repeats`` steps)."""
    plain = _step(_model(args), _clip(args), 1, None)
    sharded = _step(parallelize(_model(args), group, "t"), _sharded_input(_clip(args), group), 1, group)
    ratios = []
    for _ in range(args.rounds):
        ratios.append(best_time(sharded, args.repeats) / best_time(plain, args.repeats))
    return ratios


def dispatch_cost(args) -> float:
    """The median over alternated rounds of the group-of-one step's time over the plain step's, minus 1."""
    return statistics.median(spawn_ranks(_dispatch_rank, 1, args)[0]) - 1


def _run_world(world: int, args) -> tuple[float, float, int]:
    """(slowest rank's fwd+bwd seconds, largest rank's peak MiB, collectives per step) on ``world`` ranks."""
    results = spawn_ranks(_rank_main, world, args, timeout_min=120).values()
    return max(r[0] for r in results), max(r[1] for r in results), max(r[2] for r in results)


def _sync_rank(rank, world, args, group) -> float:
    """Seconds one small all-reduce adds between ~1 ms slices of single-thread compute on this machine."""
    a, x = torch.randn(160, 160), torch.zeros(64)

    def compute():
        for _ in range(8):
            a @ a

    def with_sync():
        compute()
        dist.all_reduce(x, group=group)

    return best_time(lambda: [with_sync() for _ in range(200)], 3) / 200 - best_time(lambda: [compute() for _ in range(200)], 3) / 200


def sync_cost(world: int) -> float:
    """The slowest rank's cost of one collective between compute slices, seconds (``_sync_rank``)."""
    return max(spawn_ranks(_sync_rank, world, None).values())


def _baseline_world(world: int, args) -> tuple[float, float, int]:
    """``_run_world`` with the package as of commit ``args.baseline`` (a git worktree in the temp dir,
    made once), in a child process whose ``nonlocal_dist`` comes from that tree."""
    repo = Path(__file__).resolve().parent.parent
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=repo, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"nonlocal_dist-{rev}"
    if not (tree / "nonlocal_dist").is_dir():
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(tree), rev], cwd=repo, check=True,
                       capture_output=True)
    command = [sys.executable, __file__, "--child-world", str(world), "--clip", *map(str, args.clip),
               "--widths", *map(str, args.widths), "--stem", str(args.stem), "--classes", str(args.classes),
               "--repeats", str(args.repeats)]
    path = os.pathsep.join([str(tree), str(Path(__file__).resolve().parent)])
    # Fresh (spawned) ranks: a fork server started here would import this checkout's package, not the tree's.
    env = {**os.environ, "PYTHONPATH": path, "NONLOCAL_FRESH_RANKS": "1"}
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def _single_process(args, threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    run = _step(_model(args), _clip(args), 1, None)
    return best_time(run, args.repeats), peak_memory_mb(run)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clip", type=int, nargs=5, action="append", metavar=("B", "C", "T", "H", "W"),
                        help="clip size (repeatable; default: 1 3 64 112 112 and 1 3 64 224 224)")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128], help="I3D stage widths")
    parser.add_argument("--stem", type=int, default=16, help="stem channels")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="ranks (1 thread each)")
    parser.add_argument("--time-world", type=int, default=2, help="ranks compared with one process of as many threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", metavar="REV",
                        help="also run --time-world ranks with the package as of git revision REV (e.g. a2bdc3e, "
                             "the class-swap parallelize before the redesign) and give the ratio")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations of the two versions with --baseline, and of the plain and the "
                             "group-of-one step (world 1)")
    parser.add_argument("--child-world", type=int, help=argparse.SUPPRESS)  # internal: one world, JSON out
    args = parser.parse_args(argv)
    if args.child_world:
        args.clip = args.clip[0]
        print(json.dumps(_run_world(args.child_world, args)))
        return []
    clips = args.clip or [[1, 3, 64, 112, 112], [1, 3, 64, 224, 224]]
    records = []
    for clip in clips:
        args.clip = clip
        records += _one_clip(args)
    cost = sync_cost(args.time_world)
    print(f"\nOne collective between ~1 ms compute slices costs {1e3 * cost:.2f} ms on {args.time_world} gloo ranks "
          "of this machine (scripts/bench_video.py sync_cost).")
    records.append({"suite": "video", "case": "sync_cost", "ranks": args.time_world, "ms": 1e3 * cost})
    return records


def _one_clip(args) -> list:
    base_t, base_mem = _single_process(args, 1)
    threaded_t, _ = _single_process(args, args.time_world)
    rows = [["1 process, 1 thread", 1e3 * base_t, base_mem, "1.00x", "-", "-"],
            [f"1 process, {args.time_world} threads", 1e3 * threaded_t, "-", "-", "1.00x", "-"]]
    records = [{"suite": "video", "ranks": 1, "threads": 1, "clip": args.clip, "fwd_bwd_ms": 1e3 * base_t,
                "peak_mb_per_rank": base_mem},
               {"suite": "video", "ranks": 1, "threads": args.time_world, "clip": args.clip, "fwd_bwd_ms": 1e3 * threaded_t}]
    for world in args.worlds:
        t, mem, collectives = _run_world(world, args)
        vs_threads = f"{t / threaded_t:.2f}x" if world == args.time_world else "-"
        rows.append([f"{world} ranks x 1 thread", 1e3 * t, mem, f"{mem / base_mem:.2f}x", vs_threads, collectives])
        records.append({"suite": "video", "ranks": world, "threads": 1, "clip": args.clip, "fwd_bwd_ms": 1e3 * t,
                        "peak_mb_per_rank": mem, "memory_vs_one_process": mem / base_mem, "collectives": collectives})
        if world == 1:  # a group of one: the dispatch of every op, no communication
            rows[-1][0] = "1 rank x 1 thread (sharded, group of one)"
            cost = dispatch_cost(args)
            rows[-1][4] = f"dispatch {cost:+.0%} of the plain step (in one process, {args.rounds} rounds alternated)"
            records[-1]["dispatch"] = cost
        if world == args.time_world and args.baseline:
            # Alternate the two versions (this machine's speed drifts): the best of each over the rounds,
            # and the median of the rounds' ratios (each round's two runs close in time).
            bt, bmem, bcoll = _baseline_world(world, args)
            ratios = [t / bt]
            for _ in range(args.rounds - 1):
                new, old = _run_world(world, args)[0], _baseline_world(world, args)[0]
                ratios.append(new / old)
                t, bt = min(t, new), min(bt, old)
            rows[-1][1], rows[-1][4] = 1e3 * t, f"{t / threaded_t:.2f}x"
            records[-1]["fwd_bwd_ms"] = 1e3 * t
            rows.append([f"{world} ranks x 1 thread, {args.baseline} (class swap)", 1e3 * bt, bmem,
                         f"{bmem / base_mem:.2f}x", f"new / old {t / bt:.3f}x (best of each); median of "
                         f"{len(ratios)} rounds' ratios {statistics.median(ratios):.3f}x", bcoll])
            records.append({"suite": "video", "ranks": world, "baseline": args.baseline, "clip": args.clip,
                            "fwd_bwd_ms": 1e3 * bt, "peak_mb_per_rank": bmem, "new_over_baseline": t / bt,
                            "median_round_ratio": statistics.median(ratios)})
    print_table(
        f"I3D-style network with non-local blocks (widths {args.widths}), clip {tuple(args.clip)}, float32, fwd+bwd, "
        "parallelize(model, group, 't') on gloo",
        ["run", "fwd+bwd ms (slowest rank)", "peak MiB per rank", "memory vs 1 process",
         f"time vs 1 process x {args.time_world} threads", "collectives per step per rank"],
        rows,
    )
    return records


if __name__ == "__main__":
    main()
