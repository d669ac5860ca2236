"""``F.pad`` on sharded activations: padding exists only at the global edges.

Along unsharded dims the pad is local. Along a sharded dim a constant pad (a causal ``(k - 1, 0)``
pad included) goes to the group's first rank (left) and last rank (right), even when that rank's
shard is empty; the result's shard lengths grow there. Other modes with a non-zero pad along a
sharded dim read positions of other ranks and are refused here.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.parallel.ops.window import bind
from nonlocal_dist.parallel.sharded import Op, ShardedTensor, rule


def _pad_ref(input, pad, mode="constant", value=None):
    """Signature of F.pad."""


@rule(F.pad)
def _pad(op: Op):
    a = bind(op, _pad_ref)
    x, pad, mode = a["input"], list(a["pad"]), a["mode"]
    local_pad, dims = list(pad), dict(x.spec.dims)
    for i in range(len(pad) // 2):
        d = x.dim() - 1 - i
        left, right = pad[2 * i], pad[2 * i + 1]
        if d not in dims or (left == 0 and right == 0):
            continue
        if mode != "constant":
            raise op.refuse(f"mode={mode!r} padding along a sharded dim reads other ranks' positions", d,
                            "pad along unsharded dims, or use a constant (zero) pad there")
        if left < 0 or right < 0:
            raise op.refuse("a negative pad (a crop) along a sharded dim", d, "slice it instead")
        shard = dims[d]
        sizes = list(shard.sizes)
        sizes[0] += left
        sizes[-1] += right
        local_pad[2 * i] = left if shard.rank == 0 else 0
        local_pad[2 * i + 1] = right if shard.rank == shard.world - 1 else 0
        dims[d] = shard.with_sizes(sizes)
    kwargs = {} if a["value"] is None else {"value": a["value"]}
    out = F.pad(x.as_subclass(Tensor), local_pad, mode=mode, **kwargs)
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), dims))
