"""Sequence parallelism: the key positions sharded over a process group (ring, all-gather, Ulysses)."""
from __future__ import annotations

from nonlocal_dist.parallel.api import parallel_nonlocal
from nonlocal_dist.parallel.distribute import distribute, from_local, full_tensor, parallelize
from nonlocal_dist.parallel.extend import local_map, positionwise, register_rule
from nonlocal_dist.parallel.failure import PeerFailure
from nonlocal_dist.parallel.sharded import ShardedTensor, ShardingRefusal
from nonlocal_dist.parallel.norm import batch_norm_rows, group_batch_norm
from nonlocal_dist.parallel.shard import gather_tensor, shard_tensor
from nonlocal_dist.parallel.spec import even_sizes, split_sizes
from nonlocal_dist.parallel.strategies import MODE_STRATEGIES, STRATEGIES

__all__ = [
    "MODE_STRATEGIES",
    "PeerFailure",
    "STRATEGIES",
    "ShardedTensor",
    "ShardingRefusal",
    "distribute",
    "from_local",
    "full_tensor",
    "parallelize",
    "gather_tensor",
    "local_map",
    "positionwise",
    "register_rule",
    "batch_norm_rows",
    "group_batch_norm",
    "parallel_nonlocal",
    "even_sizes",
    "split_sizes",
    "shard_tensor",
]
