"""Timing, peak-memory and training-job helpers shared by the benchmark suites."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from nonlocal_dist.testing import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[1]


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

    The profiler records no free made on a thread it does not follow: gloo's worker threads drop
    a collective's tensors there when they hold the last reference, at a time that varies from run
    to run. Such a block is taken as freed when the allocator hands its address out again (before,
    the running total counted it twice: peaks up to 8 % high, varying between identical steps); one
    never handed out again stays counted, so the result is an upper bound: of repeated measures of
    one step, the least is the tightest. (The profiler's ``profile_all_threads`` option records no
    memory events at all on torch 2.13.)
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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
    events.sort(key=lambda e: (e[0], e[2] > 0))  # a free before an allocation of the same instant
    live: dict[int, int] = {}
    total = peak = 0
    for _, ptr, size in events:
        if size > 0:
            total += size - live.pop(ptr, 0)  # an address handed out again was freed unseen
            live[ptr] = size
        else:
            total -= live.pop(ptr, -size)  # a block held before the call: its recorded size
        peak = max(peak, total)
    return peak / 2**20


def _storages(t):
    """The storages behind a tensor (a wrapper subclass's inner tensors: a functional collective's result)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _storages(getattr(t, name))
    elif isinstance(t, torch.Tensor):
        yield t.untyped_storage()


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
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    state = {"live": {}, "total": 0, "peak": 0}

    def free(key):
        state["total"] -= state["live"].pop(key, 0)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
            if not func.is_view:
                inputs = {x.data_ptr() for a in tree_leaves((args, kwargs)) for x in _storages(a)}
                for t in out if isinstance(out, (list, tuple)) else (out,):
                    for storage in _storages(t):
                        key = storage.data_ptr()
                        if key in state["live"] or key in inputs or storage.nbytes() == 0:
                            continue
                        state["live"][key] = storage.nbytes()
                        state["total"] += storage.nbytes()
                        weakref.finalize(storage, free, key)
            state["peak"] = max(state["peak"], state["total"])
            return out

    gc.collect()
    with Count():
        fn()
    return state["peak"] / 2**20


def saved_tensor_mb(fn: Callable[[], object]) -> float:
    """Bytes of the tensors that ``fn()``'s autograd graph saves for its backward and that ``fn``'s own
    ops created (MiB): every distinct storage an autograd node saves (``saved_tensors_hooks``, custom
    ``autograd.Function``s included) among those the call's ops made (a ``TorchDispatchMode``), each
    counted once. Parameters and inputs made before the call are not counted. It depends on neither
    threads nor timing: the activation memory a step carries from its forward into its backward,
    the part of the peak that a model's parallel form decides (the peaks above add the transients
    and the collectives' buffers, and move between runs)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    created: set[int] = set()
    saved: dict[int, int] = {}

    class Created(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
            if not func.is_view:
                created.update(x.data_ptr() for t in tree_leaves(out) for x in _storages(t))
            return out

    def pack(t):
        for storage in _storages(t):
            if storage.data_ptr() in created:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    gc.collect()
    with Created(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values()) / 2**20


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
