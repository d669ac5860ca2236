"""A graph of the backward (``create_graph=True``: second derivatives) through sequence-parallel
attention: the all-gather makes one (``sequence.allgather``); the ring and Ulysses, whose fused
kernels' backward has no derivative, refuse it on every rank, with the fix. A rank without queries
returns zero gradients tied into the graph (``zeros_in_graph``), so the second pass runs the same
collectives there as on the other ranks."""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.distributed.failure import everywhere


def refuse_graph_of_backward(strategy: str) -> None:
    """Raise (every rank reaches it alike: the same backward) where a graph of this backward is asked for."""
    if torch.is_grad_enabled():
        raise everywhere(RuntimeError(
            f"the {strategy} cannot make a graph of its backward (create_graph=True, second derivatives): its "
            "kernels' backward has no derivative. Fix: strategy='allgather', whose second derivatives are exact, "
            "or take first derivatives only"))


def zeros_in_graph(like: tuple[Tensor | None, ...], tied: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """Zeros shaped as each of ``like`` (None stays None), each depending on every tensor of ``tied`` and
    of ``like`` (the gradient, the inputs, the gathered keys) in a recorded graph."""
    tie = sum(t.sum() for t in (*tied, *like) if t is not None) * 0
    return tuple(None if t is None else t * 0 + tie for t in like)
