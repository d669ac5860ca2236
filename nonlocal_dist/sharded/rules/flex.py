"""``torch.nn.attention.flex_attention.flex_attention`` on sharded q, k and v.

torch's flex attention has no ``__torch_function__`` entry of its own and compiles its kernel even in
an eager model, so a ``ShardedTensor`` reaching it used to meet ``torch.compile`` and be refused. The
public function is wrapped here (as ``torch.autograd.backward`` is in ``sharded.tensor``): with a
``ShardedTensor`` among q, k and v the call goes through the dispatcher to the rule below; any other
call (plain tensors, a compiled region) goes straight to torch's function.

The rule is exact by construction: q, k and v are gathered whole on every rank (one differentiable
all-gather per sharded dim, logged once per call site with its bytes; the backward sums the ranks'
gradients), the user's own call (its ``score_mod``, its ``BlockMask`` built for the whole sequence,
its scale, GQA and kernel options) runs unchanged on those plain tensors, as one process runs it, and
each rank keeps its own part of the output along q's sharded dims (the log-sum-exp and max scores too).
The attention's compute is therefore replicated over the group: the layers around it stay sharded.
A score_mod, mask_mod or block mask holding a sharded tensor is refused on every rank.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.attention.flex_attention as flex_module
from torch import Tensor

from nonlocal_dist.sharded.rules.common import bind, log_once, whole_along
from nonlocal_dist.sharded.tensor import (
    _WRAPPED,
    Op,
    ShardedTensor,
    replicated_spec,
    rule,
    user_frame,
)

_plain_flex = flex_module.flex_attention


@functools.wraps(_plain_flex)
def _flex(query, key, value, *args, **kwargs):
    if not torch.compiler.is_compiling() and any(isinstance(t, ShardedTensor) for t in (query, key, value)):
        return torch.overrides.handle_torch_function(_flex, (query, key, value), query, key, value, *args, **kwargs)
    return _plain_flex(query, key, value, *args, **kwargs)


flex_module.flex_attention = _flex
_WRAPPED[_flex] = _plain_flex


def _flex_ref(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_lse=False,
              kernel_options=None, *, return_aux=None):
    """Signature of flex_attention."""


def _holds_shards(fn) -> bool:
    """Whether a score_mod or mask_mod closes over a sharded tensor (its values indexed by position)."""
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            if isinstance(cell.cell_contents, ShardedTensor):
                return True
        except ValueError:  # an empty cell
            continue
    return False


def _mine(t: Tensor, dims: dict, like: ShardedTensor) -> ShardedTensor:
    """This rank's part of ``t``, a whole result whose leading dims are q's: each of q's sharded ``dims``
    among them narrowed to this rank's positions; replicated where q is not sharded."""
    kept = {d: s for d, s in dims.items() if d < t.dim()}
    for d, shard in kept.items():
        t = t.narrow(d, shard.start, shard.local)
    spec = like.spec.remap(t.dim(), kept) if kept else replicated_spec(like.spec, t.dim())
    return ShardedTensor.wrap(t, spec)


@rule(_flex, any_operand=True)
def _flex_attention(op: Op):
    a = bind(op, _flex_ref)
    q, k, v = a["query"], a["key"], a["value"]
    block_mask = a["block_mask"]
    if _holds_shards(a["score_mod"]) or (block_mask is not None and (
            _holds_shards(getattr(block_mask, "mask_mod", None))
            or any(isinstance(t, ShardedTensor) for t in block_mask.as_tuple() if isinstance(t, Tensor)))):
        raise op.refuse("a score_mod, mask_mod or block mask that holds a sharded tensor", None,
                        "gather that tensor whole first (nonlocal_dist.sharded.full_tensor) or build it from "
                        "whole tensors")
    whole = []
    for t in (q, k, v):
        if isinstance(t, ShardedTensor):
            t = whole_along(op, t, [d for d, _ in t.spec.dims]).as_subclass(Tensor)
        whole.append(t)
    log_once(user_frame(), "flex_attention over sharded tensors: q, k and v gathered whole and the attention "
                           "run on every rank, each keeping its own output rows")
    # The user's call as given (an argument this torch does not know stays unknown), q, k and v swapped in
    names = ("query", "key", "value")
    args = [whole[i] if i < 3 else arg for i, arg in enumerate(op.args)]
    kwargs = {n: whole[names.index(n)] if n in names else arg for n, arg in op.kwargs.items()}
    result = _plain_flex(*args, **kwargs)
    like = next(t for t in (q, k, v) if isinstance(t, ShardedTensor))
    dims = dict(q.spec.dims) if isinstance(q, ShardedTensor) else {}
    if isinstance(result, Tensor):
        return _mine(result, dims, like)
    out, extra = result
    if not isinstance(extra, tuple):  # (out, lse)
        return _mine(out, dims, like), _mine(extra, dims, like)
    return _mine(out, dims, like), type(extra)(*(None if t is None else _mine(t, dims, like) for t in extra))
