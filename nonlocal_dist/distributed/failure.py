"""No rank left waiting: a rank that fails tells the others, which stop instead of hanging.

A rank that raises between two collectives (in user code, in a data-dependent check, in one of the
sharded ops) never reaches the next collective, and the other ranks would wait in it until the
process group's timeout. So the sharded runtime waits for its collectives in slices
(``wait``), and between slices looks for a failure notice in the job's key-value store (the store
``init_process_group`` made, shared by every rank). ``post`` writes that notice: ``parallelize``'s
forward hook posts any exception its model's forward raised, and the sharded ops post their own.
The waiting ranks then raise ``PeerFailure`` naming the rank and its error.

After a failure the process group is unusable (collectives were abandoned half-way), as after an
NCCL error: destroy it and restart. On NCCL a collective's ``wait`` does not block the host, so
there the notice is seen only where the host waits (gloo, the CPU path, is covered fully).
"""
from __future__ import annotations

import sys
from datetime import timedelta

import torch.distributed as dist
import torch.utils.checkpoint as checkpoint_module

_KEY = "nonlocal_dist/failure"
_SLICE = timedelta(milliseconds=100)


class PeerFailure(RuntimeError):
    """Raised on a rank whose peer failed while this rank waited for it in a collective."""


def _store():
    """The store of the current default process group (``init_process_group``'s), or None without
    one. Read at each use, never kept: a group destroyed and made again after a failure (as
    ``PeerFailure`` advises) has its own store, so the old notice is not read again."""
    if not dist.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


def everywhere(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised by every rank together (a decision from shared metadata): not posted."""
    exc.raised_on_every_rank = True
    return exc


# torch's own control flow, raised through user code and caught by torch (not failures):
# non-reentrant checkpointing stops a recomputation early with this one.
_CONTROL_FLOW: tuple[type[BaseException], ...] = (checkpoint_module._StopRecomputationError,)


def post(exc: BaseException, where: str = "") -> None:
    """Tell every rank that this rank failed with ``exc`` (first notice wins; never raises). Errors that
    every rank raises together (``everywhere``), ``PeerFailure`` itself and torch's control-flow
    exceptions are not posted."""
    if (not dist.is_initialized() or isinstance(exc, (PeerFailure, *_CONTROL_FLOW))
            or getattr(exc, "raised_on_every_rank", False)):
        return
    store = _store()
    if store is None:
        return
    text = f"rank {dist.get_rank()} raised {type(exc).__name__}: {exc}" + (f" ({where})" if where else "")
    try:
        store.compare_set(_KEY, "", text)
    except Exception:  # the store is gone (shutdown): nothing to tell
        pass


def check() -> None:
    """Raise ``PeerFailure`` when some rank has posted a failure."""
    store = _store()
    try:
        notice = store.get(_KEY).decode() if store is not None and store.check([_KEY]) else None
    except Exception:  # the store's host rank is gone: no notice to read
        notice = None
    if notice is not None:
        raise PeerFailure(f"{notice}; this rank stops too instead of waiting for it in a collective "
                          "(the process group is unusable now: destroy it and restart)")


def wait(work, *, p2p: bool = False) -> None:
    """Wait for an async collective, raising ``PeerFailure`` if a peer fails meanwhile.

    Collectives are waited for in timed slices (gloo resumes a timed-out collective wait). A
    point-to-point request (``p2p``) is waited for plainly: a timed-out gloo send/recv wait closes
    the connection, and gloo marks it complete only inside ``wait``, so it cannot be polled either.
    A peer that exits still ends the wait (its connection closes); one that raised and lives on is
    not seen there.
    """
    if p2p or _store() is None:
        work.wait()
        return
    while True:
        try:
            work.wait(timeout=_SLICE)
            return
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower():
                check()  # a peer that failed and exited closes its connections: name its error
                raise
        check()


def post_current(where: str = "") -> None:
    """``post`` the exception being handled (for hooks that run while an exception propagates)."""
    exc = sys.exc_info()[1]
    if exc is not None:
        post(exc, where)

