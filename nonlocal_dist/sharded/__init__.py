"""The sharded-activation runtime: ``ShardedTensor`` carries its ``spec`` through every torch op, by the
``rules`` (exchanges: ``halo``, ``fetch``, ``resample``); ``distribute``/``parallelize`` are its entries,
``register_rule``/``positionwise``/``local_map`` declare one's own ops, ``rng`` keeps random ops
exact, and ``sweep`` checks every rule against torch's own op samples."""
from __future__ import annotations

from nonlocal_dist.sharded import transforms  # noqa: F401  (torch.func's transforms refuse sharded inputs)
from nonlocal_dist.sharded.batchnorm import batch_norm_rows, group_batch_norm
from nonlocal_dist.sharded.distribute import (
    distribute,
    from_local,
    full_tensor,
    parallelize,
)
from nonlocal_dist.sharded.extend import local_map, positionwise, register_rule
from nonlocal_dist.sharded.tensor import ShardedTensor, ShardingRefusal

__all__ = [
    "ShardedTensor",
    "ShardingRefusal",
    "batch_norm_rows",
    "distribute",
    "from_local",
    "full_tensor",
    "group_batch_norm",
    "local_map",
    "parallelize",
    "positionwise",
    "register_rule",
]
