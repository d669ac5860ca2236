"""Timing and peak-memory helpers shared by the benchmark suites."""
from __future__ import annotations

import gc
import os
import socket
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs (seconds), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak of the bytes held by torch's allocator while ``fn()`` runs, beyond those held before (MiB).

    Every allocation and free of torch's CPU allocator during the call is recorded (profiler memory
    events, kernels' internal buffers included) and the running total's maximum is taken: the CPU
    counterpart of ``torch.cuda.max_memory_allocated`` after a reset, minus the baseline. Unlike
    peak RSS it does not depend on what malloc keeps cached, so timings need no allocator tuning.
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A GitHub-markdown table."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(_fmt(v) for v in row) + " |")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _rank_worker(rank: int, world: int, port: int, fn, args, queue, timeout_min: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=timeout_min))
    queue.put((rank, fn(rank, world, args, dist.group.WORLD)))
    dist.destroy_process_group()


def spawn_ranks(fn, world: int, args, timeout_min: float = 30) -> dict:
    """``fn(rank, world, args, group)`` on ``world`` gloo ranks of 1 thread each (127.0.0.1, a free port,
    ``timeout_min`` for every collective and for each result); returns every rank's result, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, world, port, fn, args, queue, timeout_min))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60 * timeout_min) for _ in procs)
    for p in procs:
        p.join()
    return results
