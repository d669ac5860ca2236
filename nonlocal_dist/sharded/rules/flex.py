"""``torch.nn.attention.flex_attention.flex_attention`` on sharded q, k and v.

torch's flex attention has no ``__torch_function__`` entry of its own and compiles its kernel even in
an eager model, so a ``ShardedTensor`` reaching it used to meet ``torch.compile`` and be refused. The
public function is wrapped here (as ``torch.autograd.backward`` is in ``sharded.tensor``): with a
``ShardedTensor`` among q, k and v the call goes through the dispatcher to the rule below; any other
call (plain tensors, a compiled region) goes straight to torch's function.

Queries sharded along their sequence alone (every rank holding some): the keys and values are gathered
whole (one differentiable all-gather per sharded dim, logged once per call site; the backward sums the
ranks' gradients) and each rank attends with its own queries. The user's ``score_mod`` is called with
global query positions, and the user's ``BlockMask`` (built for the whole sequence) is rebuilt for this
rank's rows from its ``mask_mod`` read at global positions, for any split, aligned to its blocks or not.
Any other case (queries whole, or sharded along batch or heads too, an empty rank, or a block mask whose
sparsity its mask_mod does not express, which flex run uncompiled ignores and a fused kernel would not):
q, k and v gathered whole, the user's call run unchanged on every rank, each keeping its own part of the
output (the attention's compute then replicated over the group). The log-sum-exp and max scores follow
the output's rows.
A score_mod or mask_mod holding a sharded tensor is refused on every rank; ``BlockMask.from_kv_blocks``
given sharded block tables (wrapped too) gathers them whole first.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.attention.flex_attention as flex_module
from torch import Tensor
from torch.utils._pytree import tree_map

from nonlocal_dist.sharded.rules.common import bind, log_once, whole_along
from nonlocal_dist.sharded.tensor import (
    _WRAPPED,
    Op,
    ShardedTensor,
    holds_sharded,
    replicated_spec,
    rule,
    user_frame,
)

_plain_flex = flex_module.flex_attention


@functools.wraps(_plain_flex)
def _flex(query, key, value, *args, **kwargs):
    if not torch.compiler.is_compiling() and holds_sharded((query, key, value)):
        return torch.overrides.handle_torch_function(_flex, (query, key, value), query, key, value, *args, **kwargs)
    return _plain_flex(query, key, value, *args, **kwargs)


flex_module.flex_attention = _flex
_WRAPPED[_flex] = _plain_flex

_plain_from_kv_blocks = inspect.getattr_static(flex_module.BlockMask, "from_kv_blocks").__func__


def _from_kv_blocks(cls, *args, **kwargs):
    """``BlockMask.from_kv_blocks`` with block tables computed from sharded activations (Kandinsky 6's NABLA
    mask ranks each query block's key blocks from the sharded queries' scores): the tables gathered whole
    (logged; they are small, one entry per pair of blocks), so the mask is the whole sequence's, as one
    process builds it. torch builds its transposed tables with ``vmap``, which cannot take shards."""
    if not torch.compiler.is_compiling() and holds_sharded((args, kwargs)):
        op = Op(_from_kv_blocks, args, kwargs)
        log_once(user_frame(), "BlockMask.from_kv_blocks on sharded block tables: gathered whole on every rank")
        args, kwargs = tree_map(lambda t: whole_along(op, t, [d for d, _ in t.spec.dims]).as_subclass(Tensor)
                                if isinstance(t, ShardedTensor) else t, (args, kwargs))
    return _plain_from_kv_blocks(cls, *args, **kwargs)


flex_module.BlockMask.from_kv_blocks = classmethod(functools.wraps(_plain_from_kv_blocks)(_from_kv_blocks))


def _flex_ref(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_lse=False,
              kernel_options=None, *, return_aux=None):
    """Signature of flex_attention."""


_SIGNATURE = inspect.signature(_flex_ref).parameters


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
    """This rank's part of ``t``, a whole result whose batch, heads and query dims are q's (the output's
    last dim is v's, and the statistics have none): each of q's sharded ``dims`` among those narrowed to
    this rank's positions; replicated where q is not sharded there."""
    kept = {d: s for d, s in dims.items() if d < 3}
    for d, shard in kept.items():
        t = t.narrow(d, shard.start, shard.local)
    spec = like.spec.remap(t.dim(), kept) if kept else replicated_spec(like.spec, t.dim())
    return ShardedTensor.wrap(t, spec)


def _shifted_score(score_mod, start: int):
    """``score_mod`` called with global query positions (flex reads a mod's arity from its signature)."""
    if score_mod is None:
        return None

    def moved(score, b, h, q, kv):
        return score_mod(score, b, h, q + start, kv)

    return moved


def _shifted_mask(mask_mod, start: int):
    """``mask_mod`` called with global query positions."""

    def moved(b, h, q, kv):
        return mask_mod(b, h, q + start, kv)

    return moved


def _hand_built(block_mask) -> bool:
    """Whether ``block_mask`` holds block sparsity its mask_mod does not express (``from_kv_blocks`` with no
    mask_mod, as Kandinsky's NABLA masks): flex attention run uncompiled reads only the mask_mod, a fused
    kernel the blocks too, so such a mask is only ever run unchanged, on the whole queries."""
    return block_mask.mask_mod is flex_module.noop_mask and not bool(block_mask.to_dense().all())


def _local_block_mask(block_mask, start: int, rows: int, device):
    """The whole sequence's ``block_mask`` for this rank's query rows ``start:start + rows`` (any ``start``,
    aligned to its blocks or not): its mask_mod read at global query positions, its blocks built anew
    from that for ``rows`` queries, as ``create_block_mask`` built the whole one."""
    batch, heads = block_mask.kv_num_blocks.shape[:2]
    return flex_module.create_block_mask(_shifted_mask(block_mask.mask_mod, start), batch, heads, rows,
                                         block_mask.seq_lengths[1], device=device, BLOCK_SIZE=block_mask.BLOCK_SIZE)


def _own_rows(q) -> object:
    """q's shard along its sequence (-2) when that is its only sharded dim and every rank holds some of
    it (each rank then attends with its own queries only); else None (the queries gathered whole)."""
    if not isinstance(q, ShardedTensor) or [d for d, _ in q.spec.dims] != [q.dim() - 2]:
        return None
    shard = q.spec.sharded[q.dim() - 2]
    return shard if min(shard.sizes) > 0 else None  # an empty rank would skip the keys' gradient exchange


def _length(t) -> int:
    """The keys' global length (their dim -2)."""
    return t.spec.global_shape(t.shape)[-2] if isinstance(t, ShardedTensor) else t.shape[-2]


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
    rows = _own_rows(q)
    if rows is not None and block_mask is not None and (
            _hand_built(block_mask) or tuple(block_mask.seq_lengths) != (rows.total, _length(k))):
        rows = None  # the whole call: torch itself refuses a mask made for other lengths, as in one process
    whole = [q.as_subclass(Tensor) if rows is not None and t is q
             else whole_along(op, t, [d for d, _ in t.spec.dims]).as_subclass(Tensor) if isinstance(t, ShardedTensor)
             else t for t in (q, k, v)]
    # The user's call as given (an argument this torch does not know stays unknown), q, k and v swapped in
    names = ("query", "key", "value")
    args = [whole[i] if i < 3 else arg for i, arg in enumerate(op.args)]
    kwargs = {n: whole[names.index(n)] if n in names else arg for n, arg in op.kwargs.items()}
    like = next(t for t in (q, k, v) if isinstance(t, ShardedTensor))
    if rows is None:
        log_once(user_frame(), "flex_attention over sharded tensors: q, k and v gathered whole and the attention "
                               "run on every rank, each keeping its own output rows")
        dims = dict(q.spec.dims) if isinstance(q, ShardedTensor) else {}
        return _each(_plain_flex(*args, **kwargs), lambda t: _mine(t, dims, like))
    log_once(user_frame(), "flex_attention over a sharded sequence: keys and values gathered whole, each rank "
                           "attending with its own queries (score_mod and block mask read at global positions)")
    moved = {"score_mod": _shifted_score(a["score_mod"], rows.start)}
    if block_mask is not None:
        moved["block_mask"] = _local_block_mask(block_mask, rows.start, rows.local, whole[0].device)
    for name, value in moved.items():
        position = list(_SIGNATURE).index(name)
        if position < len(args):
            args[position] = value
        elif name in kwargs:
            kwargs[name] = value
    dims = {q.dim() - 2: rows}
    return _each(_plain_flex(*args, **kwargs), lambda t: ShardedTensor.wrap(t, q.spec.remap(t.dim(), dims)))


def _each(result, fn):
    """``fn`` on the output of flex attention and on each of its statistics (log-sum-exp, max scores)."""
    if isinstance(result, Tensor):
        return fn(result)
    out, extra = result
    if not isinstance(extra, tuple):  # (out, lse)
        return fn(out), fn(extra)
    return fn(out), type(extra)(*(None if t is None else fn(t) for t in extra))
