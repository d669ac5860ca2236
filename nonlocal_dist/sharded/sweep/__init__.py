"""The op sweep: torch's own OpInfo samples run on sharded activations, each case classified.

The promise of ``ShardedTensor`` is that every torch op on a sharded activation is exact (equal
to one process) or refused with ``ShardingRefusal`` on every rank: never wrong, never hung, never
raised on some ranks only. The sweep looks for breaches by itself. From
``torch.testing._internal.common_methods_invocations.op_db`` it takes each op's float64 samples
and shards their tensor arguments (``cases.py``): one dim over 2 ranks unevenly, over 3 ranks with
an empty piece, two arguments or two dims of one argument over the same group, two dims over the
two groups of a 2x2 mesh. Every case runs on every rank of one persistent pool per world size
(``pool.py``, a per-case timeout; a hung or crashed pool is recorded and restarted), is gathered
and compared with the one-process float64 result, forward and input gradients (``check.py``), and
is classified exact / refused / unchecked (a random op) / BAD (``report.py``).

It lives beside the runtime it verifies (it needs the spec and the entry points) and is shared by
``scripts/op_sweep.py`` and the CI test ``tests/sharded/test_op_sweep.py``; it imports torch's
internal test package (and its ``expecttest`` dependency) only when used.
"""
from __future__ import annotations

from nonlocal_dist.sharded.sweep.cases import (
    KIND_WORLD,
    KINDS,
    Case,
    Placement,
    enumerate_cases,
)
from nonlocal_dist.sharded.sweep.pool import run_cases
from nonlocal_dist.sharded.sweep.report import Verdict, markdown

__all__ = ["KINDS", "KIND_WORLD", "Case", "Placement", "Verdict", "enumerate_cases", "markdown", "run_cases"]
