"""Shard metadata agreed once per model forward instead of once per layer.

A sharded layer needs every rank's shard length (its halo plan) and a check that the ranks' inputs
match; each costs a small all-gather, a synchronisation point (about 1 ms on gloo between two CPU
processes, a device sync on GPU). In a network those facts follow from the model's input: given
every rank's input shapes, each layer sees the same shapes at its k-th call of a forward. So
``ForwardAgreement`` all-gathers one digest of every rank's input shapes and dtypes, submodules'
training flags, grad mode and autocast state when the model's forward starts (a forward pre-hook
that ``parallelize`` registers) and lets each
layer's agreement run at its first forward under that key; later forwards with the same key reuse
its result without a collective. Every rank hits or misses together, because the key is the same
on every rank. What a layer's own agreement would have caught (a block in eval mode on one rank
alone, autocast on one rank) changes the key, so every rank agrees afresh and the layer raises.
The non-local operation's own exchange still runs every forward: it also checks that replicated
parameters (``concat_weight``) are bit-equal across ranks, which change every step.

Outside the model's forward (a layer called alone, or recomputed by activation checkpointing in
the backward) every agreement runs as usual.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from nonlocal_dist.parallel.checks import digest, exchange_device

T = TypeVar("T")


def _describe_inputs(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """A 63-bit digest of what decides each layer's shapes, dtypes and collectives in this forward: the
    tensor inputs' shapes and dtypes, every submodule's training flag (a block put in eval mode on one
    rank alone must still be caught), grad mode and autocast."""
    flags = "".join("1" if m.training else "0" for m in module.modules())
    autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
    shapes = tuple((tuple(t.shape), t.dtype) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))
    return digest((flags, torch.is_grad_enabled(), autocast, shapes))


class ForwardAgreement:
    """Per-forward cache of the sharded layers' cross-rank agreements (see the module docstring)."""

    def __init__(self, group) -> None:
        self.group = group
        self.key: tuple[int, ...] | None = None
        self.active = False
        self.calls: dict[int, int] = {}
        self.known: dict[tuple[int, int], object] = {}

    def attach(self, model: nn.Module) -> None:
        """Agree on ``model``'s inputs when its forward starts; stop reusing when it ends (even on error)."""
        model.register_forward_pre_hook(self._begin, with_kwargs=True)
        model.register_forward_hook(self._end, always_call=True)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        local = torch.tensor([_describe_inputs(module, args, kwargs)], dtype=torch.int64, device=exchange_device(self.group))
        table = local.new_empty(dist.get_world_size(self.group))
        dist.all_gather(list(table.split(1)), local, group=self.group)
        key = tuple(table.tolist())
        if key != self.key:  # new shapes somewhere: every layer agrees afresh (on every rank alike)
            self.key, self.known = key, {}
        self.calls, self.active = {}, True

    def _end(self, module: nn.Module, args: tuple, output) -> None:
        self.active = False

    def agree(self, layer: nn.Module, run: Callable[[], T], check: Callable[[T], None]) -> T:
        """``run()`` (the layer's collective agreement) at this call's first forward under the current
        key, its result afterwards; ``check(result)`` then re-checks this rank's input locally."""
        if not self.active:
            return run()
        index = self.calls.get(id(layer), 0)
        self.calls[id(layer)] = index + 1
        slot = (id(layer), index)
        if slot not in self.known:
            self.known[slot] = run()
            return self.known[slot]
        result = self.known[slot]
        check(result)
        return result
