"""Contractions: ``linear``/``matmul`` over unsharded dims, attention over a sharded sequence.

A per-position ``Linear`` (a head on every position, an MLP on tokens) contracts the channels only:
it runs locally. A ``matmul`` that contracts the sharded positions of both operands (linear
attention's ``value @ key^T``) sums each rank's product over the group: a replicated result; a whole
left operand times a right one sharded along its columns keeps them (``scores @ query``).

``F.scaled_dot_product_attention`` with q, k, v sharded along the sequence runs this package's
sequence-parallel softmax attention (``nonlocal_op(group=)``: ring / all-gather / Ulysses, exact
with uneven and empty shards). Cross-attention of sharded queries to keys and values every rank
holds whole (text tokens) runs locally, each rank's queries against all the keys, with a mask over
the keys or one sliced to the rank's query rows, and GQA; keys and values sharded otherwise than the
queries (text sliced back out of a joint sequence), and sharded keys attended by whole queries
(another modality's tokens), are gathered whole first (logged with their bytes). Causal
self-attention over a sharded sequence runs the load-balanced zigzag ring (``sequence.causal``): q,
k and v fetched into zigzag order, the output fetched back. ``parallelize(strategy=)`` chooses the
strategy of attention over its model's tokens (carried in their spec, ``ShardSpec.strategy``), or
the op refuses where that strategy cannot run it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.distributed import failure
from nonlocal_dist.distributed.collectives import gather_dims
from nonlocal_dist.distributed.shards import starts
from nonlocal_dist.sequence.api import parallel_nonlocal
from nonlocal_dist.sequence.causal import causal_ring_attention, zigzag_positions
from nonlocal_dist.sequence.strategies import MODE_STRATEGIES
from nonlocal_dist.sharded.fetch import fetch_positions
from nonlocal_dist.sharded.rules.common import (
    bind,
    gather_unaligned,
    localise,
    log_once,
    on_piece,
    output_dims,
    sum_over_groups,
    whole_along,
)
from nonlocal_dist.sharded.rules.shape import global_shape
from nonlocal_dist.sharded.tensor import (
    Op,
    ShardedTensor,
    as_local,
    replicated_or_refuse,
    replicated_spec,
    rule,
    user_frame,
)

# The strategies each form of attention over sharded keys can run; the first is its default.
CAUSAL_STRATEGIES = ("ring", "allgather")
MASKED_STRATEGIES = ("allgather",)


def _strategy(op: Op, spec, allowed: tuple[str, ...], form: str) -> str | None:
    """The strategy ``parallelize`` named for the queries' model (``ShardSpec.strategy``), or None
    (the form's default); a refusal where the form cannot run the one named."""
    chosen = spec.strategy
    if chosen is None:
        return None
    if chosen not in allowed:
        raise op.refuse(f"{form} with strategy {chosen!r} (parallelize(strategy=)); it runs {' or '.join(map(repr, allowed))}",
                        fix=f"parallelize with strategy=None (each attention its default) or one of {allowed}")
    return chosen


def _all_replicated(op: Op) -> bool:
    return all(t.spec.replicated for t in op.sharded())


@rule(F.linear, any_operand=True)
def _linear(op: Op):
    x = op.args[0]
    if not (isinstance(x, ShardedTensor) and x.spec.dims) or any(isinstance(t, ShardedTensor) for t in op._tensors()[1:]):
        if _all_replicated(op):
            return replicated_or_refuse(op)
        raise op.refuse("a sharded weight", fix="keep parameters plain (replicated)")
    if x.dim() - 1 in x.spec.sharded:
        raise op.refuse("it contracts the sharded last dim", x.dim() - 1, "move the channels last (permute) first")
    out = op.run(*op.args, **op.kwargs)  # on x itself: torch functions are off in a rule (no alias node)
    return ShardedTensor.wrap(out, x.spec)


def _sharded_only_along(t, dim: int) -> bool:
    """Whether ``t`` (2 dims or more) is sharded along ``dim`` (counted from the end, negative) alone."""
    return isinstance(t, ShardedTensor) and t.dim() >= 2 and set(t.spec.sharded) == {t.dim() + dim}


def _contracts_alike(a, b) -> bool:
    """Whether ``a @ b`` contracts a dim sharded alike in both and no other dim is sharded (a's last, b's
    second to last: a sum over the sharded positions)."""
    return (_sharded_only_along(a, -1) and _sharded_only_along(b, -2)
            and a.spec.sharded[a.dim() - 1].same(b.spec.sharded[b.dim() - 2]))


def _keys_on_the_left(a, b) -> bool:
    """Whether ``a @ b`` contracts a's sharded last dim (key positions) against b's whole rows while b's
    columns (queries) are sharded: gathering a's keys leaves b's columns to each rank."""
    return _sharded_only_along(a, -1) and _sharded_only_along(b, -1)


def _columns_sharded(a, b) -> bool:
    """Whether ``a @ b`` has a whole (plain or replicated) left operand and a right one sharded along its
    columns (its last dim) alone: every output column is one of b's, so each rank computes its own."""
    return not (isinstance(a, ShardedTensor) and a.spec.sharded) and a.dim() >= 2 and _sharded_only_along(b, -1)


def _batched_matmul(op: Op, a, b) -> ShardedTensor | None:
    """``a @ b`` with every sharded dim of either operand a batch dim (windows or frames folded into
    the batch: windowed attention's ``q @ k.transpose(-2, -1)``): each rank's batch rows, the other
    operand sliced to them or broadcast; None where the case does not apply."""
    if not all(isinstance(t, Tensor) and t.dim() >= 3 for t in (a, b)):
        return None
    if any(isinstance(t, ShardedTensor) and any(d >= t.dim() - 2 for d in t.spec.sharded) for t in (a, b)):
        return None
    ndim = max(a.dim(), b.dim())
    bmm = getattr(op.func, "__name__", "") == "bmm"
    if bmm and global_shape(a)[0] != global_shape(b)[0]:
        raise failure.everywhere(RuntimeError(
            f"batch1 and batch2 must have the same batch size, got {global_shape(a)[0]} and {global_shape(b)[0]}"))
    dims = output_dims(op, ndim)
    out = (torch.bmm if bmm else torch.matmul)(*(localise(op, t, dims, ndim) for t in (a, b)))
    spec = (a if isinstance(a, ShardedTensor) else b).spec
    return ShardedTensor.wrap(out, spec.remap(out.dim(), dims))


@rule(torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm, Tensor.bmm, any_operand=True)
def _matmul(op: Op):
    if _all_replicated(op):  # e.g. a weight gradient from a replicated head's input (ZeRO-3's linear)
        return replicated_or_refuse(op)
    a, b = op.args[:2]
    if getattr(op.func, "__name__", "") == "__rmatmul__":
        a, b = b, a
    bmm = getattr(op.func, "__name__", "") == "bmm"
    if bmm and (a.dim() != 3 or b.dim() != 3):
        raise failure.everywhere(RuntimeError("batch1 and batch2 must be 3D tensors"))
    if _contracts_alike(a, b):
        # Linear attention (Sana-Video's ``value @ key.transpose(-1, -2)``): a sum over the sharded
        # tokens, each rank's pieces multiplied and the products summed over the group (replicated).
        shard = a.spec.sharded[a.dim() - 1]
        out = sum_over_groups((torch.bmm if bmm else torch.matmul)(as_local(a), as_local(b)), [shard])
        return ShardedTensor.wrap(out, replicated_spec(a.spec, out.dim()))
    if _keys_on_the_left(a, b):
        # Attention written by hand values-first (LTX-2's audio VAE: ``bmm(v, attn^T)``, v (b, c, keys), attn^T
        # (b, keys, queries)): v's key positions gathered whole (logged), each rank keeps its query columns.
        a = whole_along(op, a, [a.dim() - 1])
    if _columns_sharded(a, b):  # linear attention's ``scores @ query``: each rank's own columns
        out = (torch.bmm if bmm else torch.matmul)(as_local(a), as_local(b))
        return ShardedTensor.wrap(out, b.spec.remap(out.dim(), {out.dim() - 1: b.spec.sharded[b.dim() - 1]}))
    if isinstance(b, ShardedTensor) and any(d >= b.dim() - 2 for d in b.spec.sharded):
        # Attention written by hand (q @ k^T, then attn @ v): the right operand's sharded key positions
        # gathered whole on every rank (the all-gather strategy, logged), the queries' rows kept.
        b = whole_along(op, b, [d for d in b.spec.sharded if d >= b.dim() - 2])
        op = Op(torch.bmm if bmm else torch.matmul, (a, b), {})
    batched = _batched_matmul(op, a, b)
    if batched is not None:
        return batched
    if not isinstance(a, ShardedTensor) or a.spec.replicated or a.dim() < 2:
        raise op.refuse("a sharded right operand with a whole or vector left one", fix="shard the left operand's rows")
    if a.dim() - 1 in a.spec.sharded:
        raise op.refuse("it contracts the sharded last dim", a.dim() - 1)
    if b.dim() > a.dim():
        raise op.refuse("a right operand with more batch dims than the sharded left one", fix="expand the left one first")
    batch = {d: s for d, s in a.spec.sharded.items() if d < a.dim() - 2}
    b = gather_unaligned(op, b, batch, a.dim())  # b's shards that a's batch rows do not line up with
    right = localise(op, b, batch, a.dim()) if b.dim() > 2 else b.as_subclass(Tensor) if isinstance(b, ShardedTensor) else b
    out = (torch.bmm if bmm else torch.matmul)(a.as_subclass(Tensor), right)
    return ShardedTensor.wrap(out, a.spec.remap(out.dim(), a.spec.sharded))


def _sdpa_ref(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Signature of F.scaled_dot_product_attention."""


@rule(F.scaled_dot_product_attention, any_operand=True)
def _sdpa(op: Op):
    a = bind(op, _sdpa_ref)
    q, k, v = a["query"], a["key"], a["value"]
    if not any(isinstance(t, ShardedTensor) and t.spec.sharded for t in (q, k, v)):  # replicated (or a mask only)
        return replicated_or_refuse(op)
    if a["dropout_p"]:
        raise op.refuse("attention dropout over sharded queries or keys", fix="use dropout_p=0 (dropout after the attention)")
    if _batch_sharded(q, k, v):
        return _batched_attention(op, a)
    if isinstance(q, ShardedTensor) and not any(isinstance(t, ShardedTensor) and t.spec.sharded for t in (k, v)):
        return _cross_attention(op, a, *(t.as_subclass(Tensor) if isinstance(t, ShardedTensor) else t for t in (k, v)))
    if not (isinstance(q, ShardedTensor) and q.spec.sharded):
        return _whole_queries(op, a)
    if _keys_split_otherwise(q, k, v):
        return _cross_attention(op, a, *(_whole_keys(op, t) for t in (k, v)))
    tensors = (q, k, v)
    if not all(isinstance(t, ShardedTensor) for t in tensors):
        raise op.refuse("q, k and v must all be sharded along the sequence")
    seq = q.dim() - 2
    specs = [t.spec.sharded for t in tensors]
    batch = {d: s for d, s in specs[0].items() if d < seq}  # batch rows sharded over another group: independent
    if (any(set(s) != {seq, *batch} for s in specs) or any(not t.spec.sharded[d].same(b) for t in tensors[1:]
                                                           for d, b in batch.items())
            or not specs[0][seq].same(specs[1][seq]) or not specs[1][seq].same(specs[2][seq])):
        raise op.refuse("q, k and v must be sharded along the sequence dim (-2), and the batch or heads dims, alike",
                        seq, "shard the tokens, the batch or the heads, not the channels")
    shard = specs[0][seq]
    # k or v broadcast over q's batch or heads (multi-query attention without an expand): the all-gather
    broadcast = not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2])  # local shapes here, alike but the sequence
    if a["attn_mask"] is not None or a["enable_gqa"] or broadcast:
        _strategy(op, q.spec, MASKED_STRATEGIES, "attention with a mask, GQA or broadcast keys over a sharded sequence")
    elif a["is_causal"]:
        if _strategy(op, q.spec, CAUSAL_STRATEGIES, "causal attention over a sharded sequence") in (None, "ring"):
            return _causal_ring(op, a, shard, batch)
    if a["attn_mask"] is not None or a["is_causal"] or a["enable_gqa"] or broadcast:
        # A mask, causal attention or grouped heads: the keys and values gathered whole (the all-gather
        # strategy), each rank's queries against all of them with the mask's rows for its queries.
        whole = gather_dims([t.as_subclass(Tensor) for t in (k, v)], seq, list(shard.sizes), shard.group)
        log_once(user_frame(), f"{op.name} over a sharded sequence with a mask, causal or GQA: keys and values "
                               f"gathered whole ({sum(t.numel() * t.element_size() for t in whole)} bytes per rank per call)")
        return _cross_attention(op, a, *whole, local_batch=True)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    local = [t.as_subclass(Tensor) for t in tensors]
    lengths = (list(shard.sizes), list(shard.sizes))  # every rank's tokens, from the spec: no agreement
    strategy = _strategy(op, q.spec, MODE_STRATEGIES["embedded_gaussian"], "attention over a sharded sequence")
    if strategy == "ulysses" and (q.dim() != 4 or q.shape[1] % shard.world):
        raise op.refuse(f"strategy 'ulysses' with {q.shape[1] if q.dim() == 4 else 1} heads over {shard.world} ranks "
                        "(it needs the heads divisible by the group size)", seq,
                        "parallelize with strategy='ring' or 'allgather', or a heads count the group size divides")
    y = parallel_nonlocal(*local, "embedded_gaussian", scale=scale, concat_weight=None, backend="auto",
                          group=shard.group, strategy=strategy, lengths=lengths)
    return ShardedTensor.wrap(y, q.spec.remap(y.dim(), {**batch, seq: shard}))


def _sequence_only(t) -> bool:
    """Whether ``t`` is a plain or replicated tensor, or one sharded along its sequence dim (-2) alone."""
    return not (isinstance(t, ShardedTensor) and t.spec.sharded) or _sharded_only_along(t, -2)


def _whole_keys(op: Op, t):
    """Keys or values ``t`` (..., M, d) whole on every rank: a sharded sequence gathered (``whole_along``,
    logged with its bytes; its backward sums the ranks' gradients), as a plain tensor."""
    if isinstance(t, ShardedTensor):
        return whole_along(op, t, [t.dim() - 2]).as_subclass(Tensor)
    return t


def _keys_split_otherwise(q, k, v) -> bool:
    """Sharded queries against keys and values sharded along their sequence alone but split otherwise
    than the queries' (another length, or text sliced back out of a joint sequence with the video and
    held by one rank, as Motif-Video's single blocks make it): they are gathered whole."""
    seq = q.dim() - 2
    if seq not in q.spec.sharded or not (_sequence_only(k) and _sequence_only(v)):
        return False
    shard = q.spec.sharded[seq]
    return not all(isinstance(t, ShardedTensor) and t.spec.sharded and t.spec.sharded[t.dim() - 2].same(shard)
                   for t in (k, v))


def _whole_queries(op: Op, a: dict) -> ShardedTensor:
    """Queries every rank holds whole against keys and values sharded along their sequence (LTX-2's
    audio attending to the sharded video): the keys, values and a mask sharded along them gathered
    whole, and the same attention run on every rank; the output is replicated."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if not (_sequence_only(k) and _sequence_only(v)):
        raise op.refuse("whole queries against keys or values sharded along other dims than their sequence (-2)",
                        None, "shard the keys' tokens only, or gather them (full_tensor)")
    if a["is_causal"]:
        raise op.refuse("causal attention of whole queries to sharded keys", None,
                        "shard the queries alike, or pass an explicit mask")
    if isinstance(mask, ShardedTensor) and mask.spec.sharded:
        if set(mask.spec.sharded) != {mask.dim() - 1}:
            raise op.refuse("a mask sharded along other dims than the keys (-1)", None, "pass the mask whole")
        mask = whole_along(op, mask, [mask.dim() - 1])
    local = [_whole_keys(op, t) if t is not q else as_local(t) for t in (q, k, v)]
    extra = {"enable_gqa": True} if a["enable_gqa"] else {}
    y = op.run(*local, attn_mask=as_local(mask), dropout_p=0.0, scale=a["scale"], **extra)
    spec = next(t for t in (k, v) if isinstance(t, ShardedTensor)).spec
    return ShardedTensor.wrap(y, replicated_spec(spec, y.dim()))


def _causal_ring(op: Op, a: dict, shard, batch: dict) -> ShardedTensor:
    """Causal self-attention, q, k and v sharded alike along the sequence: each rank fetches its
    zigzag positions (two chunks of the 2P, ``sequence.causal``), runs the load-balanced ring, and
    the output returns to the input's shards. Three fetches in (q, k, v), one out: 4 (N/P)·d values
    moved per rank, against the all-gather's (N - N/P)·2d."""
    q = a["query"]
    seq = q.dim() - 2
    total, world = shard.total, shard.world
    places = zigzag_positions(total, world)
    order = torch.cat(places)  # global position of each zigzag slot
    slot = torch.empty_like(order)
    slot[order] = torch.arange(total)
    back = [slot[s:s + n] for s, n in zip(starts(shard.sizes), shard.sizes)]
    zig = [len(p) for p in places]
    local = [fetch_positions(a[n].as_subclass(Tensor), seq, places, shard.sizes, shard.group, shard.rank)
             for n in ("query", "key", "value")]
    lead = local[0].shape[:-2]
    flat = [t.reshape(math.prod(lead), 1, *t.shape[-2:]) for t in local]  # (B, H) whatever the leading dims
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    y = causal_ring_attention(*flat, scale, shard.group, total).reshape(*lead, *flat[2].shape[-2:])
    y = fetch_positions(y, seq, back, zig, shard.group, shard.rank)
    return ShardedTensor.wrap(y, q.spec.remap(y.dim(), {**batch, seq: shard}))


def _right_aligned(dims: dict, shift: int) -> dict:
    """q's sharded dims as the output's: keys or values with more batch dims than q (broadcast) put
    ``shift`` dims in front."""
    return {d + shift: s for d, s in dims.items()}


def _batch_sharded(q, k, v) -> bool:
    """Whether q is sharded along batch dims only (frames folded into the batch, as a VAE's per-frame
    attention has them) and k and v too, over the same groups and lengths (split otherwise: resharded
    to q's rows by ``localise``; I2VGen-XL's image context, one frame held by one rank), or whole on
    every rank (Latte's text, repeated per frame): every sequence is whole on its rank."""
    if not isinstance(q, ShardedTensor) or not q.spec.sharded or max(q.spec.sharded) >= q.dim() - 2:
        return False
    dims = q.spec.sharded
    return all(not (isinstance(t, ShardedTensor) and t.spec.sharded) or (
        t.dim() == q.dim() and t.spec.sharded.keys() == dims.keys() and all(
            t.spec.sharded[d].group is dims[d].group and t.spec.sharded[d].total == dims[d].total for d in dims))
        for t in (k, v))


def _batched_attention(op: Op, a: dict) -> ShardedTensor:
    """Attention within each rank's batch rows (no communication); whole keys, values and a mask are
    sliced to those rows (length 1 broadcasts)."""
    q = a["query"]
    dims = q.spec.sharded
    mask = a["attn_mask"]
    if isinstance(mask, ShardedTensor) and any(d + q.dim() - mask.dim() not in dims for d in mask.spec.sharded):
        raise op.refuse("a mask sharded along other dims than the batch rows of q, k and v", None,
                        "pass the mask whole (it is sliced to each rank's rows)")
    mask = localise(op, mask, dims, q.dim())
    local = [q.as_subclass(Tensor), *(localise(op, a[n], dims, q.dim()) for n in ("key", "value"))]
    extra = {"enable_gqa": True} if a["enable_gqa"] else {}
    if any(t.numel() == 0 for t in local):  # no rows here (torch's CPU kernel crashes on an empty batch)
        leads = [t.shape[:-2] for t in local] + ([mask.shape[:-2]] if isinstance(mask, Tensor) else [])
        shape = (*torch.broadcast_shapes(*leads), q.shape[-2], local[2].shape[-1])
        tied = local + ([mask] if isinstance(mask, Tensor) and mask.is_floating_point() else [])
        tie = sum(t.sum() for t in tied) * 0  # every operand in the graph: zero gradients, not None
        y = local[0].new_zeros(shape) + tie
        return ShardedTensor.wrap(y, q.spec.remap(y.dim(), _right_aligned(dims, y.dim() - q.dim())))
    y = op.run(*local, attn_mask=mask, is_causal=a["is_causal"], scale=a["scale"], **extra)
    return ShardedTensor.wrap(y, q.spec.remap(y.dim(), _right_aligned(dims, y.dim() - q.dim())))


def _cross_attention(op: Op, a: dict, k: Tensor, v: Tensor, local_batch: bool = False) -> ShardedTensor:
    """Sharded queries (..., N_r, d) against whole keys and values ``k``, ``v`` (..., M, d): local
    attention per rank. ``is_causal`` (N = M, the keys gathered from the same sequence): each rank's
    rows of the causal mask, from its queries' global positions. Batch dims of the queries may be
    sharded too (over other groups): k, v and the mask are sliced to the rank's rows, unless
    ``local_batch`` (k and v gathered from the rank's own rows)."""
    q = a["query"]
    seq = q.dim() - 2
    batch = {d: s for d, s in q.spec.sharded.items() if d < seq}
    if set(q.spec.sharded) != {seq, *batch}:
        raise op.refuse("queries sharded along the channels", None,
                        "shard the tokens, the batch or the heads, not the channels")
    shard = q.spec.sharded[seq]
    if batch and isinstance(a["attn_mask"], ShardedTensor):
        raise op.refuse("a sharded mask with the batch rows sharded too", seq,
                        "pass the mask whole (it is sliced to each rank's rows and queries)")
    if batch and not local_batch:
        k, v = (localise(op, t, batch, q.dim()) for t in (k, v))
    if a["dropout_p"] or (a["is_causal"] and (a["attn_mask"] is not None or k.shape[-2] != shard.total)):
        raise op.refuse("attention dropout, or causal attention with a mask or with keys of another length", seq,
                        "pass one explicit mask (it is sliced to each rank's queries), and no dropout")
    mask = a["attn_mask"]
    if a["is_causal"]:  # SDPA's causal mask (top-left aligned), this rank's rows
        rows = torch.arange(shard.start, shard.start + shard.local, device=q.device)
        mask = rows[:, None] >= torch.arange(k.shape[-2], device=q.device)[None, :]
    if isinstance(mask, ShardedTensor):
        if mask.spec.sharded and set(mask.spec.sharded) != {mask.dim() - 2} or (
                mask.spec.sharded and not mask.spec.sharded[mask.dim() - 2].same(shard)):
            raise op.refuse("a mask sharded otherwise than the queries' rows", seq)
        mask = mask.as_subclass(Tensor)
    elif mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1 and not a["is_causal"]:
        if mask.shape[-2] != shard.total:
            raise op.refuse(f"a mask with {mask.shape[-2]} query rows for {shard.total} queries", seq)
        mask = mask.narrow(-2, shard.start, shard.local)
    if batch and mask is not None:
        mask = localise(op, mask, batch, q.dim())
    extra = {"enable_gqa": True} if a["enable_gqa"] else {}

    def attend(local_q: Tensor) -> Tensor:
        rows = mask
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] not in (1, local_q.shape[-2]):
            # an empty piece's stand-in query (``on_piece``): a row that masks nothing, dropped after
            fill = torch.ones if mask.dtype == torch.bool else torch.zeros
            rows = fill((*mask.shape[:-2], local_q.shape[-2], mask.shape[-1]), dtype=mask.dtype, device=mask.device)
        return op.run(local_q, k, v, attn_mask=rows, scale=a["scale"], **extra)

    y = on_piece(attend, q.as_subclass(Tensor), [seq])
    return ShardedTensor.wrap(y, q.spec.remap(y.dim(), _right_aligned({**batch, seq: shard}, y.dim() - q.dim())))



@rule(torch.einsum, any_operand=True)
def _einsum(op: Op):
    """``einsum`` over sharded letters (MViT's relative positions, ``"bythwc,tkc->bythwk"``): each rank's
    positions; a whole operand indexed by a sharded letter is sliced to the rank's part (length 1
    broadcasts). A contracted sharded letter (attention pooling's ``"bnk,bnc->bkc"``) is summed over
    its group after the local einsum (one all-reduce: the result is replicated over it). Two letters
    sharded over one group are refused."""
    if _all_replicated(op):
        return replicated_or_refuse(op)
    equation = op.args[0]
    operands = list(op.args[1]) if len(op.args) == 2 and isinstance(op.args[1], (list, tuple)) else list(op.args[1:])
    if not isinstance(equation, str) or "->" not in equation or "..." in equation:
        raise op.refuse("an einsum without an explicit output ('->') or with '...'", fix="spell every index out")
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    letters: dict[str, object] = {}
    for t, term in zip(operands, terms):
        for d, shard in (t.spec.dims if isinstance(t, ShardedTensor) else ()):
            letter = term[d]
            if term.count(letter) > 1:
                raise op.refuse(f"a diagonal along the sharded index {letter!r} (it repeats in one operand)", d,
                                "take the diagonal where the tensor is whole")
            if letter in letters and not letters[letter].same(shard):
                raise op.refuse(f"index {letter!r} is sharded differently in two operands", d)
            letters[letter] = shard
    groups = [id(s.group) for s in letters.values()]
    if len(set(groups)) < len(groups):
        raise op.refuse("two indices sharded over one group (an outer product of shards)", None,
                        "gather one operand first, or contract it")
    local = []
    for t, term in zip(operands, terms):
        own = t.spec.sharded if isinstance(t, ShardedTensor) else {}
        base = t.as_subclass(Tensor) if isinstance(t, ShardedTensor) else t
        for d, letter in enumerate(term):
            shard = letters.get(letter)
            if shard is None or d in own:
                continue
            if base.shape[d] == shard.total and shard.total != 1:
                base = base.narrow(d, shard.start, shard.local)
            elif base.shape[d] != 1:
                raise op.refuse(f"an operand of length {base.shape[d]} along index {letter!r}, sharded with length "
                                f"{shard.total}", d)
        local.append(base)
    out = sum_over_groups(torch.einsum(equation, *local), [s for k, s in letters.items() if k not in output])
    spec = next(t for t in operands if isinstance(t, ShardedTensor)).spec
    return ShardedTensor.wrap(out, spec.remap(out.dim(), {output.index(k): s for k, s in letters.items() if k in output}))
