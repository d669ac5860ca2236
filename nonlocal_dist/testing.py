"""One rank launcher for the tests and the benchmarks: run a function on real gloo ranks (127.0.0.1)
with a timeout (NCCL on request, for a one-rank group on a GPU).

Ranks persist: ``run_ranks`` keeps one pool of ``world`` processes per world size and hands each call
to it, so a test pays for a process group (milliseconds), not for starting Python and importing
torch on every rank (seconds); a pool's ranks are forked from a fork server that imported torch and
this package once (``rank_context``). Each call gets a new process group over its own prefix of one store
that the parent process serves (on a port the OS chose, so no port can be taken between choosing it
and listening on it), the torch seed of a fresh process, and default dtype and grad mode reset. A pool
is retired (its processes killed, the next call starts a new one) after any failure or hang, after a
call that imported DeepSpeed or W&B (they keep global state that outlives a process group), and on
torch < 2.8 (see ``distributed.teardown``). ``NONLOCAL_FRESH_RANKS=1`` spawns fresh ranks for every call.
"""
from __future__ import annotations

import atexit
import itertools
import os
import pickle
import queue as queue_module
import signal
import socket
import sys
import threading
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nonlocal_dist.distributed.mesh import _SPANS as span_groups
from nonlocal_dist.distributed.teardown import GIL_FREE_TEARDOWN, end_process_groups

# Modules whose global state outlives a process group: a rank that imported one is not reused.
_STATEFUL_MODULES = ("deepspeed", "wandb")


# What every rank imports, imported once by the fork server that the ranks of ``run_ranks``' pools
# (and the op sweep's) are forked from: about 2 s of CPU per rank when each was spawned fresh.
_PRELOAD = ["torch", "torch.distributed", "nonlocal_dist", "nonlocal_dist.sharded", "nonlocal_dist.testing"]


def rank_context():
    """The ``multiprocessing`` context persistent ranks start in: forked from a fork server (a fresh,
    single-threaded process that imported ``_PRELOAD``), so each rank starts with torch and this
    package imported and nothing else of the caller's state (unlike a plain fork of the caller)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first rank)
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank() -> None:
    """A rank's first step: lead its own process group (it is ended with everything it started),
    end that group when the process that started the rank dies (``multiprocessing.parent_process``:
    forked from the fork server, the rank's OS parent is the server, which outlives its caller while
    any rank lives), and compute on one thread."""
    os.setsid()
    caller = mp.parent_process()
    if caller is not None:
        threading.Thread(target=_end_with, args=(caller.sentinel,), daemon=True).start()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def _end_with(sentinel) -> None:
    wait([sentinel])  # ready once the caller is gone, however it ended (a rank hung in a collective too)
    os.killpg(0, signal.SIGKILL)


def package_mismatch(package: str) -> str | None:
    """Why this rank cannot run the caller's calls: the fork server imported this package from
    another place than the caller did (it imports with its own path: the working directory first)."""
    import nonlocal_dist

    if os.path.realpath(nonlocal_dist.__file__) == os.path.realpath(package):
        return None
    return (f"this rank imported nonlocal_dist from {nonlocal_dist.__file__}, the process that started it from "
            f"{package}: run from the checkout that is installed, or set NONLOCAL_FRESH_RANKS=1")


def _run_one(rank, world, fn, args, backend, pg_timeout, store=None, port=None) -> tuple[str, bytes | str]:
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        init = {"store": store} if store is not None else {"init_method": f"tcp://127.0.0.1:{port}"}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout), **init)
        result = fn(rank, world, *args)
        # Plain pickling copies tensors by value: torch's shared-memory handles would die with the rank.
        return "ok", pickle.dumps(result)
    except BaseException:  # report every failure, assertion or not, to the parent
        return "error", traceback.format_exc()


def _worker(rank, world, port, fn, args, queue, backend="gloo", pg_timeout=60.0):
    """A fresh rank for one call."""
    start_rank()
    status, payload = _run_one(rank, world, fn, args, backend, pg_timeout, port=port)
    # The result reaches the parent before any teardown: a teardown that hangs (torch < 2.8, see
    # distributed.teardown) cannot hold it back.
    _flush(queue, (rank, 0, status, payload, False))
    if not end_process_groups():
        os._exit(0)  # torch < 2.8 with gloo: no destructor, in teardown or in finalization


def _pool_worker(rank, world, port, tasks, results, package):
    """A persistent rank: runs calls from ``tasks`` until told to stop (None) or retired."""
    start_rank()
    seed = torch.initial_seed()  # what a fresh process starts with
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=300))
    mismatch = package_mismatch(package)
    while True:
        task = tasks.get()
        if task is None:
            return
        call, fn, args, pg_timeout = task
        if mismatch is not None:
            _leave(results, (rank, call, "error", mismatch, False))
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        status, payload = _run_one(rank, world, fn, args, "gloo", pg_timeout, store=dist.PrefixStore(f"call{call}", store))
        if status != "ok":  # report first: tearing down a group stuck in an abandoned collective can take long
            _leave(results, (rank, call, status, payload, False))
        span_groups.clear()  # this call's mesh groups die with its default group
        reusable = end_process_groups() and not any(m in sys.modules for m in _STATEFUL_MODULES)
        results.put((rank, call, status, payload, reusable))
        if not reusable:
            _leave(results, None)


def _flush(results, last) -> None:
    """Put ``last`` (if any) and wait until the queue's feeder thread has written everything."""
    if last is not None:
        results.put(last)
    results.close()
    results.join_thread()


def _leave(results, last) -> None:
    """``_flush``, then end this rank without teardown."""
    _flush(results, last)
    os._exit(0)


def _kill_group(pid: int) -> None:
    """Kill what is left of a rank's process group (the rank if it hangs, and any compiler, loader
    worker or other child it left behind)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Pool:
    """``world`` persistent gloo ranks and the store their process groups meet in."""

    def __init__(self, world: int) -> None:
        ctx = rank_context()
        self.world = world
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.calls = itertools.count()
        package = sys.modules["nonlocal_dist"].__file__
        self.procs = [ctx.Process(target=_pool_worker, args=(r, world, self.store.port, self.tasks[r], self.results,
                                                             package))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def submit(self, fn, args, pg_timeout: float) -> int:
        call = next(self.calls)
        for q in self.tasks:
            q.put((call, fn, args, pg_timeout))
        return call

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            _kill_group(p.pid)


_POOLS: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


def _in_rank_order(results: dict, errors: dict, world: int) -> list:
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world)]


def _collect(results_queue, world: int, call: int, timeout: float) -> tuple[dict, dict, bool]:
    results, errors, reusable = {}, {}, True
    try:
        while len(results) + len(errors) < world:
            rank, got, status, payload, keep = results_queue.get(timeout=timeout)
            if got != call:
                continue
            reusable &= keep
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
    except queue_module.Empty as exc:  # some rank hung
        raise AssertionError(f"ranks did not finish within {timeout}s (finished: {sorted(results)}; errors: {errors})") from exc
    return results, errors, reusable


def _use_pool(backend: str) -> bool:
    return backend == "gloo" and GIL_FREE_TEARDOWN and os.environ.get("NONLOCAL_FRESH_RANKS", "") in ("", "0")


def run_ranks(fn, world: int, *args, timeout: float = 120.0, backend: str = "gloo", pg_timeout: float = 60.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks (``backend="nccl"``: rank r on GPU r);
    return the results in rank order. ``fn`` must be picklable (a module-level function); each rank
    runs one thread; ``pg_timeout``: seconds any one collective may wait. The default process group
    is this call's own; ``fn`` must not destroy it (the ranks do, after it returns).

    Fails (AssertionError with every rank's traceback) when a rank raises, and when the ranks do not
    finish within ``timeout`` seconds (they are killed with their children: a hang fails instead of
    blocking CI).
    """
    if not _use_pool(backend):
        return _run_fresh(fn, world, args, timeout, backend, pg_timeout)
    pool = _POOLS.get(world) or _POOLS.setdefault(world, _Pool(world))
    call = pool.submit(fn, args, pg_timeout)
    reusable = False
    try:
        results, errors, reusable = _collect(pool.results, world, call, timeout)
    finally:
        if not reusable:
            _POOLS.pop(world, None)
            pool.close()
    return _in_rank_order(results, errors, world)


def _run_fresh(fn, world: int, args, timeout: float, backend: str, pg_timeout: float) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, backend, pg_timeout)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results, errors, _ = _collect(queue, world, 0, timeout)
    finally:
        for p in procs:
            p.join(timeout=10)
            _kill_group(p.pid)
    return _in_rank_order(results, errors, world)
