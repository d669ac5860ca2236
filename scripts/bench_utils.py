"""Timing and peak-memory helpers shared by the benchmark suites."""
from __future__ import annotations

import gc
import time
from typing import Callable


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


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak resident-set growth (MiB) while ``fn()`` runs, measured in this process.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``), takes the current RSS as the
    baseline and reads ``VmHWM`` afterwards: tensors alive before the call are not counted.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    baseline = _status_mb("VmRSS:")
    fn()
    return max(_status_mb("VmHWM:") - baseline, 0.0)


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
