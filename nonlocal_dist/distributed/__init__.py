"""Distributed primitives: raw c10d calls (``comm``) and their autograd forms (``collectives``), shard
arithmetic (``shards``), mesh groups (``mesh``), agreement checks (``checks``), the failure protocol
(``failure``) and ending process groups (``teardown``). Nothing here knows the non-local operation or
the sharded runtime; ``sequence`` and ``sharded`` are built on it."""
from __future__ import annotations

from nonlocal_dist.distributed.failure import PeerFailure
from nonlocal_dist.distributed.shards import even_sizes, split_sizes
from nonlocal_dist.distributed.teardown import end_process_groups

__all__ = ["PeerFailure", "end_process_groups", "even_sizes", "split_sizes"]
