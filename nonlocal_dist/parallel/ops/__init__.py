"""The sharding rules of ``ShardedTensor``, one module per family of ops (importing registers them)."""
from __future__ import annotations

from nonlocal_dist.parallel.ops import attention, index, norm, pointwise, reduce, resize, shape, transpose, window

__all__ = ["attention", "index", "norm", "pointwise", "reduce", "resize", "shape", "transpose", "window"]
