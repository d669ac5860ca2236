"""Timing, peak-memory and training-job helpers shared by the benchmark suites."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_leaves

from nonlocal_dist.testing import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[1]


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs (seconds), after ``warmup`` runs."""
    return min(step_times(fn, repeats, warmup))


def step_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall time of each of ``repeats`` runs of ``fn()`` (seconds), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak of the bytes held by torch's allocator while ``fn()`` runs, beyond those held before (MiB).

    Every allocation and free of torch's CPU allocator during the call is recorded (profiler memory
    events, kernels' internal buffers included) and the running total's maximum is taken: the CPU
    counterpart of ``torch.cuda.max_memory_allocated`` after a reset, minus the baseline. Unlike
    peak RSS it does not depend on what malloc keeps cached, so timings need no allocator tuning.

    The profiler records no free made on a thread it does not follow: gloo's worker threads drop
    a collective's tensors there when they hold the last reference, at a time that varies from run
    to run. So every storage the call's ops return is watched (a ``TorchDispatchMode``) and its real
    free time, on whichever thread, is taken from a finalizer (the profiler's clock is the wall
    clock): the block is freed then. A block the profiler saw allocated but no op returned (a
    kernel's workspace, a collective's internal buffer) and never saw freed is taken as freed when
    the allocator hands its address out again, and one never handed out again stays counted, so the
    result is still an upper bound (tighter than with the address rule alone: a 2-rank DiT step's
    packed all-to-all buffers counted as held until their addresses came back, 1-2 MiB of a 7 MiB
    peak at times). Of repeated measures of one step the least is the tightest. (The profiler's
    ``profile_all_threads`` option records no memory events at all on torch 2.13.)
    """
    watched: list[list] = []  # [data_ptr, ns when an op returned it, ns when it was freed or None]

    def stamp(box: list) -> None:
        box[2] = time.time_ns()

    def watch(storage) -> None:
        if storage.nbytes():
            box = [storage.data_ptr(), time.time_ns(), None]
            watched.append(box)
            weakref.finalize(storage, stamp, box)

    def mark() -> tuple[int, int]:  # a wall-clock time and a block of a size no op makes, allocated just after it
        now = time.time_ns()
        marks.append(torch.empty(_MARK_BYTES, dtype=torch.uint8))
        return now, marks[-1].data_ptr()

    marks: list[torch.Tensor] = []
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        before = mark()
        with _NewStorages(watch):
            fn()
        gc.collect()  # storages the call left in reference cycles
        after = mark()
    marks.clear()
    tree = getattr(getattr(prof.profiler, "kineto_results", None), "experimental_event_tree", None)
    if tree is None:
        raise RuntimeError(f"peak_memory_mb reads the profiler's event tree (kineto_results.experimental_event_tree), "
                           f"which torch {torch.__version__} does not have; use peak_tensor_mb, or torch 2.8-2.14")
    events, nodes = [], list(tree())
    while nodes:
        node = nodes.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    if not events and any(e.cpu_memory_usage for e in prof.events()):  # the public record saw memory move
        raise RuntimeError(f"peak_memory_mb found no allocation in the profiler's event tree on torch "
                           f"{torch.__version__}, which its public events show: the private tree's layout changed "
                           "(its _ExtraFields_Allocation nodes); use peak_tensor_mb")
    # The profiler's clock against the wall clock: the two marks' allocations against the times before them.
    offsets = [next(when for when, ptr, size in events if ptr == at and size == _MARK_BYTES) - now
               for now, at in (before, after)]
    offset = min(offsets)
    # Each watched storage's free, as an event on the allocation it came from (the last one at its address
    # before the op returned it): kind 0 a free, 1 an allocation, 2 a finalizer's free of allocation ``index``.
    allocations: dict[int, list[tuple[int, int]]] = {}
    for index, (when, ptr, size) in enumerate(events):
        if size > 0:
            allocations.setdefault(ptr, []).append((when, index))
    timeline = [(when, 1 if size > 0 else 0, ptr, size, index) for index, (when, ptr, size) in enumerate(events)]
    for ptr, returned, freed in watched:
        made = [index for when, index in allocations.get(ptr, ()) if when <= returned + offset]
        if freed is not None and made:
            timeline.append((freed + offset, 2, ptr, 0, made[-1]))
    timeline.sort(key=lambda e: (e[0], e[1] == 1))  # a free before an allocation of the same instant
    live: dict[int, tuple[int, int]] = {}  # ptr -> (size, index of its allocation)
    gone: set[int] = set()  # addresses freed by a finalizer, not handed out since: their recorded free is one
    total = peak = 0
    for _, kind, ptr, size, index in timeline:
        if kind == 1:
            gone.discard(ptr)
            total += size - live.pop(ptr, (0, None))[0]  # an address handed out again was freed unseen
            live[ptr] = (size, index)
        elif kind == 0:
            if ptr in gone:
                gone.discard(ptr)
                continue
            total -= live.pop(ptr, (-size, None))[0]  # a block held before the call: its recorded size
        elif live.get(ptr, (0, None))[1] == index:  # freed on another thread, the block still counted
            total -= live.pop(ptr)[0]
            gone.add(ptr)
        peak = max(peak, total)
    return peak / 2**20


_MARK_BYTES = 999_983  # peak_memory_mb's clock marks: a size (a prime) no op of a benchmark allocates


def _storages(t):
    """The storages behind a tensor (a wrapper subclass's inner tensors: a functional collective's result)."""
    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _storages(getattr(t, name))
    elif isinstance(t, torch.Tensor):
        yield t.untyped_storage()


class _AfterEveryOp(TorchDispatchMode):
    """Calls ``seen(func, args, kwargs, out)`` after every op returns."""

    def __init__(self, seen: Callable) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        self.seen(func, args, kwargs, out)
        return out


class _NewStorages(_AfterEveryOp):
    """Calls ``found(storage)`` for every storage an op returns that none of its arguments held: a
    view, or an argument written in place, adds none."""

    def __init__(self, found: Callable) -> None:
        def seen(func, args, kwargs, out) -> None:
            if func.is_view:
                return
            inputs = {x.data_ptr() for a in tree_leaves((args, kwargs)) for x in _storages(a)}
            for t in tree_leaves(out):
                for storage in _storages(t):
                    if storage.data_ptr() not in inputs:
                        found(storage)

        super().__init__(seen)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _malloc_held() -> Callable[[], int] | None:
    """A function giving the bytes glibc's malloc has handed out and not had back (``mallinfo2``: the
    chunks in use in every arena, every thread's, plus the blocks it mmapped), or None off glibc 2.33+
    or where another allocator serves malloc (tcmalloc or jemalloc preloaded: glibc's count then does
    not move when torch allocates)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def held() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    before = held()
    probe = torch.empty(2**20, dtype=torch.uint8)
    counted = held() - before >= probe.nbytes
    del probe
    return held if counted else None


def peak_heap_mb(fn: Callable[[], object]) -> float:
    """Peak of the bytes malloc holds while ``fn()`` runs, beyond those it held before (MiB), read
    after every op (glibc's ``mallinfo2``, Linux).

    It counts what the process really holds, whichever thread allocated or frees it: tensors
    (torch's CPU allocator is malloc), a collective's buffers until gloo's worker thread drops them,
    gloo's own buffers, kernels' buffers that outlive their op, larger Python objects. It misses what
    one op allocates and frees inside itself (a kernel's workspace: ``peak_memory_mb`` sees those)
    and Python's small objects (its own arenas). Read at the same points of every run, it is far
    steadier than the profiler's allocator peak (``peak_memory_mb``: frees on threads the profiler
    does not follow); the README gives both spreads for a DiT step."""
    held = _malloc_held()
    if held is None:
        raise RuntimeError("peak_heap_mb reads glibc's mallinfo2 (glibc 2.33+, Linux, malloc not replaced by a "
                           "preloaded allocator), which this process lacks; use peak_tensor_mb or peak_memory_mb")
    gc.collect()
    base = held()
    peak = [base]

    def seen(*_op) -> None:
        peak[0] = max(peak[0], held())

    with _AfterEveryOp(seen):
        fn()
    return (peak[0] - base) / 2**20


def peak_tensor_mb(fn: Callable[[], object]) -> float:
    """Peak of the bytes held by the tensors ``fn()`` creates, while it runs (MiB): every op's new
    output storage is counted from the op (a ``TorchDispatchMode``) until it is freed, on whichever
    thread frees it. Steadier than the allocator's events (``peak_memory_mb``), but not exact to the
    byte across runs where gloo's worker threads drop a collective's buffers at varying times (a DiT
    step at 512 tokens: up to 2.4 % between runs), and blind to what kernels allocate inside one op
    (their workspaces).
    Views and results written into an argument add nothing (so an ``out=`` buffer an op allocates,
    or an argument's ``resize_``, goes uncounted); a wrapper subclass's inner tensors (a functional
    collective's result) are counted."""
    state = {"live": {}, "total": 0, "peak": 0}

    def free(key):
        state["total"] -= state["live"].pop(key, 0)

    def count(storage) -> None:
        key = storage.data_ptr()
        if key in state["live"] or storage.nbytes() == 0:
            return
        state["live"][key] = storage.nbytes()
        state["total"] += storage.nbytes()
        state["peak"] = max(state["peak"], state["total"])
        weakref.finalize(storage, free, key)

    gc.collect()
    with _NewStorages(count):
        fn()
    return state["peak"] / 2**20


def saved_tensor_mb(fn: Callable[[], object]) -> float:
    """Bytes of the tensors that ``fn()``'s forward saves for its backward and that ``fn``'s own ops
    created, alive when its backward starts (MiB): every distinct storage an autograd node saved
    (``saved_tensors_hooks``, custom ``autograd.Function``s included) among those the call's ops made
    (a ``TorchDispatchMode``), counted at the first unpack. Parameters and inputs made before the
    call are not counted, nor what a branch of the graph that was dropped had saved. It depends on
    neither threads nor timing: the activation memory a step carries from its forward into its
    backward, the part of the peak that a model's parallel form decides (the peaks add transients
    and the collectives' buffers, and move between runs)."""
    created: dict[int, weakref.ref] = {}  # address -> the storage an op made there (an address is reused)
    saved: dict[int, tuple[weakref.ref, int]] = {}  # id of a saved storage -> (it, its bytes)
    carried: list[float] = []

    def made(storage) -> None:
        created[storage.data_ptr()] = weakref.ref(storage)

    def pack(t):
        for storage in _storages(t):
            ref = created.get(storage.data_ptr())
            if ref is not None and ref() is storage:
                saved[id(storage)] = (weakref.ref(storage), storage.nbytes())
        return t

    def unpack(t):
        if not carried:  # the backward's first use: what the forward left saved
            carried.append(sum(size for ref, size in saved.values() if ref() is not None) / 2**20)
        return t

    gc.collect()
    with _NewStorages(made), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        fn()
    return carried[0] if carried else 0.0


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


def _with_group(rank: int, world: int, fn, args):
    return fn(rank, world, args, dist.group.WORLD)


def spawn_ranks(fn, world: int, args, timeout_min: float = 30) -> dict:
    """``fn(rank, world, args, group)`` on ``world`` gloo ranks of 1 thread each (``nonlocal_dist.testing``:
    127.0.0.1, a free port, ``timeout_min`` for every collective and for the results); every rank's
    result, by rank."""
    results = run_ranks(_with_group, world, fn, args, timeout=60 * timeout_min, pg_timeout=60 * timeout_min)
    return dict(enumerate(results))


def train_job(out: Path, model: str, steps: int, extra: list[str] = (), tree: Path = ROOT,
              bin_dir: Path | None = None) -> dict:
    """One ``tree``'s ``scripts/train.py`` run on 2 CPU ranks (torchrun from ``bin_dir``, default this
    Python's; SP = 2, ZeRO-2, W&B off) for ``steps`` steps of ``model``, writing into ``out``; its
    result JSON (``train_seconds``: the training loop's wall time)."""
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = bin_dir or Path(sys.executable).parent
    cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tree / "scripts/train.py"), "--model", model, "--deepspeed_config", str(tree / "configs/ds_zero2.json"),
           "--sp-size", "2", "--steps", str(steps), "--ckpt-dir", str(out / "ckpt"), "--run-dir", str(out),
           "--wandb", "disabled", "--quiet", *extra]
    env = dict(os.environ, WANDB_SILENT="true", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    name = ("" if model == "c2d" else f"{model}-") + "nonlocal-sp2-zero2"
    return json.loads((out / f"{name}.json").read_text())
