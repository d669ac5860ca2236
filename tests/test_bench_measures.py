"""The benchmarks' memory measures (``scripts/bench_utils.py``) against known allocations."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_utils  # noqa: E402

MIB = 2**20

needs_glibc = pytest.mark.skipif(bench_utils._malloc_held() is None, reason="peak_heap_mb reads glibc's mallinfo2")


@needs_glibc
def test_heap_peak_counts_what_is_held_together():
    def step():
        a = torch.ones(2 * MIB)  # 8 MiB
        b = a + 1  # 16 MiB held together
        del a, b
        c = torch.ones(MIB)  # 4 MiB: below the peak
        return c.sum()

    assert 15.9 <= bench_utils.peak_heap_mb(step) <= 16.5


@needs_glibc
def test_heap_peak_counts_a_buffer_another_thread_frees():
    """A tensor whose last reference another thread drops (as gloo's worker threads drop a collective's
    buffers) is held until that thread frees it, and no longer: 8 MiB there and 4 MiB made meanwhile,
    then 6 MiB more once it is freed (18 MiB if that free went unseen)."""
    release = threading.Event()

    def step():
        held = [torch.ones(2 * MIB)]
        worker = threading.Thread(target=lambda box: (release.wait(), box.clear()), args=(held,))
        worker.start()
        held = None  # the worker's list is the last reference
        c = torch.ones(MIB)
        release.set()
        worker.join()
        d = torch.ones(3 * MIB // 2)  # 6 MiB
        return c, d

    assert 11.9 <= bench_utils.peak_heap_mb(step) <= 12.5
