"""Geometry of a sliding window (convolution, pooling) along the shard axis, and its sharded input.

Ownership rule: global output o belongs to the rank that holds input position ``o * stride``; with
every shard boundary on the stride grid, rank r's outputs start at ``a_r / stride`` and the output
stays sharded in rank order (a stride-1 'same' layer keeps the shard lengths). To compute them, rank
r needs the global positions ``[a_r - pad_left, a_r + L_r - pad_left + extent)`` of the padded axis:
``pad_left`` before its shard and ``extent - pad_left`` after it (``extent = dilation * (kernel - 1)``),
from its neighbours (``halo_exchange``), or the layer's padding value beyond the global edges. The
last rank also takes every output past the last input position (``pad_right`` larger than needed).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.distributed.shards import piece, split_sizes
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

    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1)

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


def span(window: Window, sizes: list[int] | tuple[int, ...], rank: int) -> tuple[int, int, int]:
    """Rank ``rank``'s window of the padded axis: (padding positions before it, after it, its length).

    The window is ``[a_r - pad_left, end)`` with ``end = a_r + L_r - pad_left + extent`` clipped to the
    padded axis (the last rank's reaches its end); positions outside ``[0, N)`` are padding."""
    total, start = sum(sizes), piece(sizes, rank)[0]
    end = start + sizes[rank] - window.pad_left + window.extent
    end = total + window.pad_right if rank == len(sizes) - 1 else min(end, total + window.pad_right)
    return max(0, window.pad_left - start), max(0, end - total), end - (start - window.pad_left)


def output_lengths(window: Window, sizes: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Every rank's number of outputs along the axis (the windows that start in its shard)."""
    return tuple(max(0, (span(window, sizes, r)[2] - window.extent - 1) // window.stride + 1)
                 for r in range(len(sizes)))


def _check_alignment(sizes: list[int], stride: int, what: str) -> None:
    starts = list(shard_starts(sizes)[1:])  # the rank boundaries
    if stride > 1 and any(s % stride for s in starts):
        raise ValueError(
            f"{what} has stride {stride} along the shard axis, but the shard lengths {sizes} put rank "
            f"boundaries at {starts}, not all multiples of {stride}: each rank's outputs would start off "
            f"the stride grid. Shard so that every rank but the last holds a multiple of {stride} positions "
            f"(of the positions this layer sees), e.g. {list(split_sizes(sum(sizes), len(sizes), stride))} "
            f"for {sum(sizes)} positions on {len(sizes)} ranks."
        )


def sliding_window(
    fn: Callable[[Tensor], Tensor], x: Tensor, dim: int, window: Window, sizes: list[int], group, what: str, value: float
) -> tuple[Tensor, tuple[int, int, int]]:
    """This rank's outputs of the window op ``fn`` (no padding along ``dim``) over the padded axis.

    Rank r's window of the padded axis is ``[a_r - pad_left, end)``: ``pad_left`` positions before
    its shard (the lower ranks' halo, or ``value`` beyond the global start), the shard, then
    ``extent - pad_left`` after it (or the last rank's ``pad_right``), assembled by one
    ``halo_exchange``; ``fn`` runs once on it. Returns the outputs and ``(left, right, length)``:
    the padding positions at the two ends of the window and its length. ``sizes``: every rank's L.
    Raises on every rank when the shard boundaries are off the stride grid.
    """
    _check_alignment(sizes, window.stride, what)
    left, right, _ = span(window, sizes, dist.get_rank(group))
    ext = halo_exchange(x, dim, window.pad_left, window.extent - window.pad_left, sizes, group, (left, right), value)
    with contextlib.nullcontext() if ext is x else _saved_as_shard(ext, x, dim, window.pad_left):
        out = apply_windows(fn, ext, {dim: window}, value)
    return out, (left, right, ext.shape[dim])


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
