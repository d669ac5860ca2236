"""Geometry of a sliding window (convolution, pooling) along the shard axis, and its sharded input.

Ownership rule. Output o's window covers the (unpadded) input positions ``[o*s - pad_left,
o*s - pad_left + extent]`` (``extent = dilation * (kernel - 1)``, s the stride); its *anchor* is the
input position ``o*s + c`` with ``c = max(0, extent - pad_left - pad_right)``, and o belongs to the
rank that holds its anchor (the first rank also every output before, the last every output after).
For a 'same' layer (``pad_left + pad_right = extent``) the anchor is ``o*s`` itself, so a stride-1
'same' layer keeps the shard lengths. A layer written as an explicit pad before a 'valid'
convolution (``F.pad`` or ``cat`` of frames in front, which land on the first rank: a causal pad of
k-1 frames, a symmetric one of (k-1)/2) is anchored by the pad's length (``lead``, carried on the
input's ``Shard``): its output keeps the shard lengths of the unpadded input, so the boundaries do
not drift from layer to layer. A pad after the last rank (``trail``: a right pad before a strided
'valid' convolution) moves the anchor back by its length, as the layer's own right padding would.

Rank r > 0 owns the outputs from ``o_r = ceil((a_r - c) / s)`` on; its window of the padded axis
starts ``before = pad_left + e`` positions before its shard, where ``e = a_r - o_r*s`` must be the
same on every rank boundary (``window_offset``; a boundary at the end of the axis, after which
every rank is empty, is free where no output lies wholly in the right padding). It needs ``extent - before`` positions after its shard, from its
neighbours (``halo_exchange``), or the layer's padding value beyond the global edges. Where the
boundaries share no offset (a strided layer after shards of odd lengths), the caller first moves
them to the nearest ones that do (``aligned_sizes``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.distributed.shards import piece
from nonlocal_dist.distributed.shards import starts as shard_starts
from nonlocal_dist.sharded.halo import constant_pad, halo_exchange


@dataclass(frozen=True)
class Window:
    """One axis of a sliding window: kernel, stride, dilation and padding (left, right) positions."""

    kernel: int
    stride: int
    dilation: int
    pad_left: int
    pad_right: int
    lead: int = 0  # positions a pad put before the input's first rank (``Shard.lead``)
    trail: int = 0  # positions a pad put after the input's last rank (``Shard.trail``)

    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1)

    @property
    def anchor(self) -> int:
        """c: the offset from ``o*stride`` of the input position that decides which rank owns output o:
        the positions a pad put in front (``lead``) where the window spans them, else its unpadded span
        less the positions a pad put after (``trail``)."""
        free = max(0, self.extent - self.pad_left - self.pad_right)
        return self.lead if 0 < self.lead <= free else max(0, free - self.trail)

    @property
    def position_wise(self) -> bool:
        """True when every output position reads only its own input position."""
        return self.kernel == 1 and self.stride == 1 and self.pad_left == self.pad_right == 0

    def refusal(self) -> str | None:
        """Why this window cannot be sharded (None when it can)."""
        if self.pad_left > self.extent:
            return (
                f"its padding before the shard axis ({self.pad_left}) exceeds the window's extent "
                f"dilation*(kernel-1) = {self.extent}: outputs would read padding only"
            )
        return None


def window_offset(window: Window, sizes: list[int] | tuple[int, ...]) -> int | None:
    """e: how far before its shard (beyond ``pad_left``) every rank but the first starts its window,
    the same for all; None when the rank boundaries give no common offset (``aligned_sizes``)."""
    total, offsets = sum(sizes), set()
    free = window.extent >= window.pad_left + window.pad_right  # no output lies wholly in the right padding
    for b in shard_starts(sizes)[1:]:
        if b == total and total > 0 and free:  # every rank from here on is empty: it owns no output
            continue
        first = max(0, -((window.anchor - b) // window.stride))  # ceil((b - c) / s), at least 0
        offsets.add(b - first * window.stride)
    if not offsets:
        return window.anchor
    if len(offsets) > 1 or min(offsets) < 0:
        return None
    return offsets.pop()


def aligned_sizes(window: Window, sizes: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Shard lengths close to ``sizes`` (each boundary moved to the nearest ``c + k*stride``, or to the
    end of the axis) that share one window offset: the split to reshard to when ``sizes`` do not."""
    total, c, s = sum(sizes), window.anchor, window.stride
    # The end of the axis is a free boundary where no output lies wholly in the right padding.
    last = total if window.extent >= window.pad_left + window.pad_right else c + s * max(0, (total - c) // s)
    bounds = []
    for b in shard_starts(sizes)[1:]:
        moved = c + s * max(0, (2 * (b - c) + s) // (2 * s))  # the nearest grid point, ties upward
        bounds.append(min(moved, last))
    edges = [0, *bounds, total]
    return tuple(edges[i + 1] - edges[i] for i in range(len(sizes)))


def span(window: Window, sizes: list[int] | tuple[int, ...], rank: int, offset: int = 0) -> tuple[int, int, int]:
    """Rank ``rank``'s window of the padded axis: (padding positions before it, after it, its length).

    The window is ``[a_r - before, end)`` with ``before = pad_left`` on the first rank and
    ``pad_left + offset`` on the others (``offset`` from ``window_offset``), ``end = a_r + L_r +
    extent - pad_left - offset`` clipped to the padded axis (the last rank's reaches its end);
    positions outside ``[0, N)`` are padding."""
    total, start = sum(sizes), piece(sizes, rank)[0]
    before = window.pad_left + (offset if rank else 0)
    end = start + sizes[rank] - window.pad_left - offset + window.extent
    end = total + window.pad_right if rank == len(sizes) - 1 else min(end, total + window.pad_right)
    return max(0, before - start), max(0, end - total), end - (start - before)


def output_lengths(window: Window, sizes: list[int] | tuple[int, ...], offset: int = 0) -> tuple[int, ...]:
    """Every rank's number of outputs along the axis (the windows whose anchor lies in its shard)."""
    return tuple(max(0, (span(window, sizes, r, offset)[2] - window.extent - 1) // window.stride + 1)
                 for r in range(len(sizes)))


def halo_lengths(window: Window, offset: int) -> tuple[int, int]:
    """(before, after): the positions every rank's window reaches beyond its shard on each side."""
    before = window.pad_left + offset
    return before, window.extent - before


def sliding_window(
    fn: Callable[[Tensor], Tensor], x: Tensor, dim: int, window: Window, sizes: list[int], group, value: float,
    offset: int,
) -> Tensor:
    """This rank's outputs of the window op ``fn`` (no padding along ``dim``) over the padded axis.

    Rank r's window of the padded axis (``span``): ``before`` positions before its shard (the lower
    ranks' halo, or ``value`` beyond the global start), the shard, then ``extent - before`` after it
    (or the last rank's ``pad_right``), assembled by one ``halo_exchange``; ``fn`` runs once on it.
    ``sizes``: every rank's L, sharing the window offset ``offset`` (``window_offset``).
    """
    rank = dist.get_rank(group)
    left, right, _ = span(window, sizes, rank, offset)
    before, after = halo_lengths(window, offset)
    ext = halo_exchange(x, dim, before, after, sizes, group, (left, right), value)
    at = window.pad_left + (offset if rank else 0)
    with contextlib.nullcontext() if ext is x else _saved_as_shard(ext, x, dim, at):
        return apply_windows(fn, ext, {dim: window}, value)


# The innermost saved-tensor hooks (a private accessor, present from torch 2.8, the floor).
_TOP_HOOKS = torch._C._autograd._top_saved_tensors_default_hooks


class _Rebuilt:
    """``ext`` as saved for backward: the shard x (alive anyway) and copies of ext's two short ends."""

    def __init__(self, x: Tensor, ends: tuple[Tensor, Tensor], dim: int) -> None:
        self.x, self.version, self.ends, self.dim = x.detach(), x._version, ends, dim

    def tensor(self) -> Tensor:
        if self.x._version != self.version:
            raise RuntimeError(
                "the input of a sharded convolution/pooling layer (saved for its backward) was modified by an "
                f"in-place operation after the layer ran (version {self.x._version}, expected {self.version}); "
                "use the out-of-place operation (e.g. relu instead of relu_) on that tensor"
            )
        return torch.cat([self.ends[0], self.x, self.ends[1]], self.dim)


def _saved_as_shard(ext: Tensor, x: Tensor, dim: int, offset: int):
    """While the window op runs on ``ext`` (x at ``offset`` along ``dim``, halos and padding around it):
    where the op saves ``ext`` for backward, keep x (alive anyway: the layer before saved it, or it is
    the input) and copies of ext's two short ends, and rebuild ``ext`` by one concatenation in the
    backward. Saves a copy of the shard per layer between forward and backward. Inside an
    activation-checkpointed region (an outer saved-tensor mechanism, which recomputes instead of
    saving) nothing is changed."""
    outer = _TOP_HOOKS(False)
    if not (torch.is_grad_enabled() and ext.numel()) or outer is not None:
        return contextlib.nullcontext()
    # The hooks live as long as what they saved: they must not hold ext, only how to recognise it.
    tail = offset + x.shape[dim]
    ends = (ext.narrow(dim, 0, offset).clone(), ext.narrow(dim, tail, ext.shape[dim] - tail).clone())
    rebuilt = _Rebuilt(x, ends, dim)
    key = (ext.data_ptr(), ext.shape, ext.stride(), ext.dtype)

    def pack(t: Tensor):
        return rebuilt if (t.data_ptr(), t.shape, t.stride(), t.dtype) == key else t

    def unpack(packed):
        return packed.tensor() if isinstance(packed, _Rebuilt) else packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def apply_windows(fn: Callable[[Tensor], Tensor], ext: Tensor, windows: dict[int, Window], value: float) -> Tensor:
    """``fn(ext)``, or its empty result along every dim of ``windows`` (dim -> window) where ext is
    shorter than one window there (padded with ``value`` to run, emptied after)."""
    short = {d: w.extent + 1 - ext.shape[d] for d, w in windows.items() if w.extent + 1 > ext.shape[d]}
    for d, n in short.items():
        ext = constant_pad(ext, [0, 0] * (ext.dim() - 1 - d) + [0, n], value)
    out = fn(ext)
    for d in short:
        out = out.narrow(d, 0, 0)
    return out
