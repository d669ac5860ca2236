"""Ending process groups: destroyed on torch >= 2.8; on torch < 2.8 with gloo (whose destructor can
hang at exit) skipped with one warning, so the caller leaves by ``os._exit``."""
from __future__ import annotations

import warnings

import torch.distributed as dist

from nonlocal_dist.distributed import teardown
from nonlocal_dist.testing import run_ranks


def _teardown_worker(rank, world):
    saved = teardown.GIL_FREE_TEARDOWN
    teardown.GIL_FREE_TEARDOWN, teardown._warned = False, False  # as on torch < 2.8, nothing said yet
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = teardown.end_process_groups(), teardown.end_process_groups()
        still_there = dist.is_initialized()
    finally:
        teardown.GIL_FREE_TEARDOWN, teardown._warned = saved, False
    destroyed = teardown.end_process_groups()  # this torch (>= 2.8): destroyed
    return first, second, still_there, [str(w.message) for w in caught], destroyed, dist.is_initialized()


def test_old_torch_skips_the_gloo_teardown_once_warned_and_new_torch_destroys():
    for first, second, still_there, messages, destroyed, after in run_ranks(_teardown_worker, 2, timeout=60):
        assert (first, second, still_there) == (False, False, True)
        assert len(messages) == 1 and "PR #154976" in messages[0] and "os._exit" in messages[0], messages
        assert destroyed and not after
