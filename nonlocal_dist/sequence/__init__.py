"""Sequence-parallel attention: the key positions j sharded over a process group (ring, all-gather,
Ulysses; ``strategies``), the ring's log-sum-exp ``merge``, and ``shard_tensor``/``gather_tensor``
to cut a tensor along a named axis. ``parallel_nonlocal`` is the entry behind ``nonlocal_op(group=)``."""
from __future__ import annotations

from nonlocal_dist.sequence.api import check_strategy_alone, parallel_nonlocal
from nonlocal_dist.sequence.shard import gather_tensor, shard_tensor
from nonlocal_dist.sequence.strategies import MODE_STRATEGIES, STRATEGIES

__all__ = ["MODE_STRATEGIES", "STRATEGIES", "check_strategy_alone", "gather_tensor", "parallel_nonlocal", "shard_tensor"]
