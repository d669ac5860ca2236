"""Activation checkpointing applied from outside (torchtitan's ``apply_ac``): chosen modules of an
unchanged model recompute their forward in the backward instead of keeping their activations.

Each chosen module keeps its class, parameters and state-dict keys: only its ``forward`` is
replaced on the instance. Exact: gradients and BatchNorm statistics equal those of a run without
checkpointing (the recomputation runs on copies of the module's buffers, so running statistics
are updated once per step). Apply it after ``nonlocal_dist.parallelize``: under sequence
parallelism the recomputation repeats the module's collectives, in the same order on every rank.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from nonlocal_dist.block import NonLocalBlock

__all__ = ["KINDS", "apply_activation_checkpointing", "checkpointed_call"]

KINDS = ("torch", "deepspeed")


def apply_activation_checkpointing(
    model: nn.Module, kind: str = "torch", modules: tuple[type, ...] = (NonLocalBlock,)
) -> nn.Module:
    """Checkpoint every instance of ``modules`` in ``model`` (default: the non-local blocks); returns ``model``.

    ``kind``: ``"torch"`` (``torch.utils.checkpoint``, non-reentrant) or ``"deepspeed"``
    (``deepspeed.checkpointing.checkpoint``, DeepSpeed's own, configured by its engine). Only
    training-mode forwards with gradients enabled are checkpointed.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, modules)]
    for name, module in chosen:
        if "forward" in vars(module):
            raise ValueError(f"{name or 'the model'} ({type(module).__name__}) already has its forward replaced "
                             "(checkpointed twice?); apply checkpointing once")
        module.forward = functools.partial(checkpointed_call, module.forward, module, kind)
    return model


def checkpointed_call(forward: Callable, module: nn.Module, kind: str, *args):
    """``forward(*args)`` without its activations kept; the backward's recomputation leaves buffers alone."""
    if not (module.training and torch.is_grad_enabled()):
        return forward(*args)
    calls = []

    def run(*inputs):
        if not calls:
            calls.append(1)
            return forward(*inputs)
        with _scratch_buffers(module):
            return forward(*inputs)

    if kind == "torch":
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
    import deepspeed

    return deepspeed.checkpointing.checkpoint(run, *args)


@contextlib.contextmanager
def _scratch_buffers(module: nn.Module) -> Iterator[None]:
    """Run with copies of every buffer under ``module`` (BatchNorm updates its running statistics on every
    training forward). Copies rather than restoring values: autograd saved the originals."""
    owners = [(m, name, buf) for m in module.modules() for name, buf in m._buffers.items() if buf is not None]
    for owner, name, buf in owners:
        owner._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for owner, name, buf in owners:
            owner._buffers[name] = buf
