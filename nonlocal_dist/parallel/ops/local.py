"""Ops that act along unsharded dims only run on each rank's piece, empty pieces included.

Many ATen kernels reject a zero-length dim other than the batch (``F.interpolate``, reflect
``F.pad``, ``instance_norm``): on a rank whose piece is empty along the sharded dim they would raise
while the other ranks, and one process, compute. ``on_piece`` runs such a kernel on one zero
position instead and keeps none of its output along that dim: the result is the empty piece of the
right shape, in the autograd graph (weights get a zero gradient from it), decided from the spec
alike on every rank.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def on_piece(fn: Callable[[Tensor], Tensor], local: Tensor, dims) -> Tensor:
    """``fn(local)`` for ``fn`` that keeps each of ``dims`` (the sharded dims of ``local``, shape
    ``(..., L_r, ...)``) in place and acts along the others; empty along one of them: an empty result."""
    empty = [d for d in dims if local.shape[d] == 0]
    for d in empty:
        shape = list(local.shape)
        shape[d] = 1
        local = torch.cat([local, local.new_zeros(shape)], d)
    out = fn(local)
    for d in empty:
        out = out.narrow(d, 0, 0)
    return out
