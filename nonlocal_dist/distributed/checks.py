"""Validate locally, exchange metadata, raise on every rank: the one rule of every sequence-parallel entry.

A rank that rejects its inputs must not leave the others waiting in a collective that never comes.
So every entry point (``nonlocal_op(group=)``, the block's forward, ``affinity_rows``) runs its local
checks inside ``agree_across_ranks``: the checks' outcome and a row of metadata travel in one small
all-gather, and every rank raises when any rank failed or when the ranks disagree. The rare failure
paths gather the error texts and the differing values themselves, so the message names them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.distributed.comm import all_gather_into
from nonlocal_dist.distributed.failure import everywhere

T = TypeVar("T")

#: Exchanged as is; anything else travels as a digest and is gathered only to name a disagreement.
Value = int | float | str | bool | None | torch.dtype | Tensor | tuple

_HINTS = {
    "concat_weight": (
        "concat_weight is a replicated parameter: broadcast it from rank 0 before training "
        "(torch.distributed.broadcast(block.concat_weight.data, src=0), as DDP does at wrap time) or build "
        "the model with the same torch.manual_seed on every rank"
    ),
}


def digest(value: Value) -> int:
    """A 63-bit digest equal on every process for equal values (tensors: dtype, shape and exact bits)."""
    h = hashlib.blake2b(digest_size=8)
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def _describe(value: Value) -> str:
    if isinstance(value, Tensor):
        t = value.detach().double().cpu()
        head = ", ".join(f"{v:.6g}" for v in t.reshape(-1)[:3].tolist())
        return f"tensor{tuple(t.shape)} [{head}{', ...' if t.numel() > 3 else ''}] sum {t.sum().item():.9g}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def exchange_device(group) -> torch.device:
    """CPU for gloo (and mixed backends), this process's GPU where the group has only NCCL."""
    backend = str(dist.get_backend(group))
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def agree_across_ranks(
    group,
    validate: Callable[[], tuple[T, Mapping[str, Value]]],
    names: tuple[str, ...],
    *,
    what: str,
    free: tuple[str, ...] = (),
) -> tuple[T, dict[str, list]]:
    """Run ``validate`` on this rank, then make every rank of ``group`` agree or raise.

    ``validate()`` returns ``(result, fields)`` with one value per name in ``names`` (the same names
    on every rank), or raises ``ValueError``/``TypeError``. Ints are all-gathered as they are; other
    values (mode names, dtypes, queries, tensors such as a replicated weight) as exact digests.
    Returns ``(result, {name: value per rank})``, the digested fields as this rank's value on every
    rank (they are equal). Raises on every rank:

    - the rank(s) whose ``validate`` failed: their own error; the others: a ``ValueError`` naming the
      failing rank(s) and their messages;
    - any field outside ``free`` that differs between ranks: a ``ValueError`` naming the field and
      every rank's value (and how to fix a differing replicated parameter).
    """
    result, fields, error = None, {}, None
    try:
        result, fields = validate()
    except (ValueError, TypeError) as exc:
        error = exc
    if error is None and set(fields) != set(names):
        raise RuntimeError(f"{what}: validate returned fields {sorted(fields)}, expected {sorted(names)}")
    if dist.get_world_size(group) == 1:  # nothing to agree on
        if error is not None:
            raise everywhere(error)
        return result, {"world_size": [1], **{name: [fields[name]] for name in names}}
    plain = {name: fields.get(name) for name in names}
    # ints travel as themselves (shapes are shown per rank); the rest as digests; -1 stands in on a failed rank.
    codes = [0 if error is None else 1] + [
        (v if isinstance(v, int) and not isinstance(v, bool) else digest(v)) if error is None else -1
        for v in plain.values()
    ]
    local = torch.tensor([dist.get_world_size(group), *codes], dtype=torch.int64, device=exchange_device(group))
    table = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    all_gather_into(table, local, group)
    rows = torch.stack(table).cpu().tolist()
    failed = [rank for rank, row in enumerate(rows) if row[1]]
    if failed:
        _raise_failed(group, failed, error, what)
    values = {"world_size": [row[0] for row in rows]}
    values.update({name: [row[2 + i] for row in rows] for i, name in enumerate(names)})
    differing = [name for name in values if name not in free and len(set(values[name])) > 1]
    if differing:
        _raise_mismatch(group, differing, values, plain, what, free)
    for name, v in plain.items():
        if not isinstance(v, int) or isinstance(v, bool):
            values[name] = [v] * len(rows)
    return result, values


def _raise_failed(group, failed: list[int], error: Exception | None, what: str) -> None:
    # Rare path: every rank enters it (all saw the same table), so one object all-gather is safe.
    texts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(texts, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise everywhere(error)
    reasons = "; ".join(f"rank {rank}: {texts[rank]}" for rank in failed)
    raise everywhere(ValueError(
        f"rank(s) {failed} of the sequence-parallel group rejected their inputs to {what}, so this rank stops "
        f"too instead of waiting for them: {reasons}"
    ))


def _raise_mismatch(group, differing: list[str], values: dict, plain: dict, what: str, free: tuple[str, ...]) -> None:
    shown: list = [None] * dist.get_world_size(group)
    digested = [n for n in differing if n in plain and not (isinstance(plain[n], int) and not isinstance(plain[n], bool))]
    if digested:
        dist.all_gather_object(shown, {n: _describe(plain[n]) for n in digested}, group=group)
    parts = []
    for name in differing:
        per_rank = [row[name] for row in shown] if name in digested else values[name]
        parts.append(f"{name} per rank = [{', '.join(map(str, per_rank))}]")
    hints = "".join(f" Fix: {_HINTS[n]}." for n in differing if n in _HINTS)
    varying = " (only the number of positions of each rank's shard may differ)" if free else ""
    raise everywhere(ValueError(
        f"sequence-parallel ranks disagree before the first collective: {'; '.join(parts)}. Every rank of the "
        f"group must call {what} with the same settings and shapes{varying}.{hints}"
    ))


def agree_on_shards(
    group,
    x: Tensor,
    layout,
    channels: int,
    shard_axis: str | tuple[str, ...],
    sub_sample: Mapping[str, int],
    *,
    what: str,
    extra: Callable[[], tuple[T, Mapping[str, Value]]] | None = None,
    extra_names: tuple[str, ...] = (),
) -> tuple[T | None, list]:
    """Check this rank's slice x of a ``layout`` tensor sharded along ``shard_axis``, on every rank at once.

    ``shard_axis``: one axis name, or several (a tensor sharded over a 2-D mesh, ``group`` spanning
    it). Locally: x is a tensor of the layout with ``channels`` channels, plus ``extra()`` (more
    local checks returning ``(result, fields)`` for ``extra_names``). Across ranks: every axis but
    the shard axes equal, one dtype, the extra fields equal, and every shard length a multiple of
    its axis's ``sub_sample`` factor (a pooling window must not cross ranks). Returns ``(extra's
    result, every rank's shard length)`` (per rank an int for one shard axis, a tuple for several);
    raises on every rank otherwise.
    """
    shard_axes = (shard_axis,) if isinstance(shard_axis, str) else tuple(shard_axis)
    others = tuple(name for name in layout.names if name not in shard_axes)
    factors = [sub_sample.get(a, 1) for a in shard_axes]
    length_names = ("shard_length",) if len(shard_axes) == 1 else tuple(f"shard_length_{a}" for a in shard_axes)

    def validate():
        if not isinstance(x, Tensor):
            raise TypeError(f"the input must be a torch.Tensor in layout {layout.text!r}, got {type(x).__name__}")
        layout.check(x, channels)
        sizes = layout.sizes(x)
        result, fields = extra() if extra is not None else (None, {})
        lengths = {n: sizes[a] for n, a in zip(length_names, shard_axes)}
        remainder = sum(sizes[a] % f for a, f in zip(shard_axes, factors))
        return result, {**{n: sizes[n] for n in others}, "dtype": x.dtype, **lengths, "pool_remainder": remainder,
                        **fields}

    result, values = agree_across_ranks(
        group, validate, (*others, "dtype", *length_names, "pool_remainder", *extra_names), what=what,
        free=(*length_names, "pool_remainder"),
    )
    per_axis = [values[n] for n in length_names]
    lengths = per_axis[0] if len(per_axis) == 1 else list(zip(*per_axis))
    if any(values["pool_remainder"]):
        raise everywhere(ValueError(pooling_across_ranks(shard_axes, factors, lengths) + "."))
    return result, lengths


def pooling_across_ranks(axes, factors: list[int], lengths) -> str:
    """The error for a ``sub_sample`` window that would cross rank boundaries: ``axes`` sharded, pooled
    by ``factors``, with every rank's ``lengths`` (per rank an int for one axis, a tuple for several)."""
    factor = factors[0] if len(factors) == 1 else tuple(factors)
    return (f"sub_sample pools shard axis {' '.join(axes)} by {factor}, but the shard lengths {lengths} are not "
            f"all divisible by {factor}: pooling windows would cross rank boundaries. Shard so that every rank "
            "holds a multiple of the factor")


__all__ = ["agree_across_ranks", "agree_on_shards", "digest", "exchange_device", "pooling_across_ranks"]
