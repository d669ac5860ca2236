"""One rank launcher for the tests and the benchmarks: run a function on real gloo ranks (spawned
processes, 127.0.0.1, a free port) with a timeout (NCCL on request, for a one-rank group on a GPU)."""
from __future__ import annotations

import os
import pickle
import signal
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nonlocal_dist.parallel.teardown import end_process_groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue, backend="gloo", pg_timeout=60.0):
    os.setsid()  # the rank leads its own process group: run_ranks ends it with everything it started
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout)
        )
        result = fn(rank, world, *args)
        # Plain pickling copies tensors by value: torch's shared-memory handles would die with the rank.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure, assertion or not, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        # The result reaches the parent before any teardown: the queue's feeder thread is joined here,
        # so a teardown that hangs (torch < 2.8, see parallel.teardown) cannot hold the result back.
        queue.close()
        queue.join_thread()
        if not end_process_groups():
            os._exit(0)  # torch < 2.8 with gloo: no destructor, in teardown or in finalization


def _kill_group(pid: int) -> None:
    """Kill what is left of a rank's process group (the rank if it hangs, and any compiler, loader
    worker or other child it left behind)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_ranks(fn, world: int, *args, timeout: float = 120.0, backend: str = "gloo", pg_timeout: float = 60.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks (``backend="nccl"``: rank r on GPU r);
    return the results in rank order. ``fn`` must be picklable (a module-level function); each rank
    runs one thread; ``pg_timeout``: seconds any one collective may wait.

    Fails (AssertionError with every rank's traceback) when a rank raises, and when the ranks do not
    finish within ``timeout`` seconds (they are killed with their children: a hang fails instead of
    blocking CI).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, backend, pg_timeout)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
    except Exception as exc:  # queue.Empty: some rank hung
        raise AssertionError(f"ranks did not finish within {timeout}s (finished: {sorted(results)}; errors: {errors})") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            _kill_group(p.pid)
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world)]
