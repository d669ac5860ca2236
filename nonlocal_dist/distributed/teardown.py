"""Ending a job's process groups without the exit hang of torch < 2.8.

torch before 2.8 runs a process group's destructor with the GIL held. The destructor joins gloo's
worker threads, and one of them may still be freeing the last collective's tensor, which needs the
GIL: ``dist.destroy_process_group()`` (or interpreter finalization, which destroys a group left alive)
then never returns, after the job's work is done. torch 2.8 releases the GIL first (pytorch PR
#154976). This package claims torch >= 2.8; these helpers keep a job that runs on an older torch
anyway (a pinned cluster) from being kept alive by its own teardown.

A script's last lines, whatever the torch::

    flush_outputs()              # results, logs and queues written first
    end_process_groups()         # destroys them; on torch < 2.8 with gloo: skipped, said once
    os._exit(0)                  # where end_process_groups returned False: no finalization either
"""
from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist

# torch >= 2.8 releases the GIL before a process group's destructor joins its threads.
GIL_FREE_TEARDOWN = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)

_warned = False


def flush_outputs() -> None:
    """Flush stdout and stderr (a rank's last lines must be out before anything can hang)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):  # closed or replaced by a test harness
            pass


def teardown_can_hang() -> bool:
    """Whether destroying the default group may hang at exit here: torch < 2.8 and a gloo group."""
    if GIL_FREE_TEARDOWN or not dist.is_available() or not dist.is_initialized():
        return False
    return "gloo" in str(dist.get_backend())


def end_process_groups() -> bool:
    """Destroy every process group of this process; return True when they were destroyed.

    On torch < 2.8 with gloo the destruction can hang after the work is done (the module's
    docstring): it is skipped with one warning, and the caller should leave with ``os._exit`` after
    writing its results (``False`` is returned), so that interpreter finalization does not run the
    same destructor."""
    global _warned
    flush_outputs()
    if not dist.is_available() or not dist.is_initialized():
        return True
    if teardown_can_hang():
        if not _warned:
            _warned = True
            warnings.warn(
                f"torch {torch.__version__} destroys a gloo process group with the GIL held and can hang at "
                "exit (fixed in torch 2.8, pytorch PR #154976): destroy_process_group() skipped; leave with "
                "os._exit() after writing results, or upgrade to torch >= 2.8",
                RuntimeWarning,
                stacklevel=2,
            )
        return False
    dist.destroy_process_group()
    return True
