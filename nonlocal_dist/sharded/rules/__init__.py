"""The sharding rules of ``ShardedTensor``, one module per family of ops (importing registers them)."""
from __future__ import annotations

from nonlocal_dist.sharded.rules import (
    along,
    attention,
    autograd,
    conv_pool,
    flex,
    index,
    norm,
    pointwise,
    reduce,
    resize,
    shape,
    transpose,
)

__all__ = ["along", "attention", "autograd", "conv_pool", "flex", "index", "norm", "pointwise", "reduce", "resize", "shape", "transpose"]
