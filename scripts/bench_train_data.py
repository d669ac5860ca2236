"""The main job from video files against the same job from memory, in one run: ``scripts/train.py``
(2 ranks, SP = 2, ZeRO-2, torchrun) trained for ``--steps`` steps on the digit clips held in memory,
then read from their FFV1 files (each rank decoding its own frames, ``--workers`` DataLoader workers,
``--cache-mb`` MiB of decoded shards kept), alternated ``--rounds`` times (a busy machine slows both
alike); the best round of each is shown.

    python scripts/bench_train_data.py [--model c2d] [--steps 600] [--rounds 2] [--cache-mb 64] [--workers 1]

Columns: the training loop's wall time (``train_seconds``), the part of it spent waiting for a batch
(``data_seconds``: the DataLoader, ``agree_usable`` and the fed-clips all-reduce, collective waits
included), and the loop time over the memory run's. The two give the same losses bit for bit: the
table says so.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench_utils import print_table, train_job


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["c2d", "i3d"], default="c2d")
    p.add_argument("--steps", type=int, default=600, help="training steps per run (an epoch is 94 steps)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the runs (best taken)")
    p.add_argument("--cache-mb", type=float, default=64, help="decoded-shard cache per worker (0: decode every read)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--videos", help="where the clip files are written once (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    files = ["--video-workers", str(args.workers), "--video-cache-mb", str(args.cache_mb)]
    quiet = ["--ckpt-every", str(args.steps), "--maps-every", "0"]  # one checkpoint, no attention maps
    with tempfile.TemporaryDirectory() as tmp:
        videos = args.videos or str(Path(tmp) / "videos")
        runs = {"memory": [], "files": []}
        for r in range(args.rounds):
            runs["memory"].append(train_job(Path(tmp) / f"memory{r}", args.model, args.steps, quiet))
            runs["files"].append(train_job(Path(tmp) / f"files{r}", args.model, args.steps,
                                           [*quiet, "--videos", videos, *files]))
    best = {kind: min(results, key=lambda res: res["train_seconds"]) for kind, results in runs.items()}
    same = all(res["history"] == best["memory"]["history"] for results in runs.values() for res in results)
    base = best["memory"]["train_seconds"]
    rows, records = [], []
    for kind, res in best.items():
        rows.append([kind, res["train_seconds"], res["data_seconds"], f"{res['train_seconds'] / base:.2f}x",
                     f"{res['test_accuracy']:.3f}"])
        records.append({"suite": "train_data", "kind": kind, **{k: res[k] for k in
                        ("train_seconds", "data_seconds", "test_accuracy")}})
    print_table(f"{args.model}, {args.steps} steps, 2 ranks (SP = 2), files: {args.workers} worker(s), cache "
                f"{args.cache_mb:g} MiB; best of {args.rounds} alternated rounds; load average "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; losses equal in every run: {same}",
                ["clips from", "loop (s)", "waiting for data (s)", "loop / memory", "held-out acc"], rows)
    return records


if __name__ == "__main__":
    main()
