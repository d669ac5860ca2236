"""A graph of the backward (``create_graph=True``: second derivatives) through sequence-parallel
attention: the all-gather makes one (``sequence.allgather``); the ring and Ulysses, whose fused
kernels' backward has no derivative, refuse it on every rank, with the fix."""
from __future__ import annotations

import torch

from nonlocal_dist.distributed.failure import everywhere


def refuse_graph_of_backward(strategy: str) -> None:
    """Raise (every rank reaches it alike: the same backward) where a graph of this backward is asked for."""
    if torch.is_grad_enabled():
        raise everywhere(RuntimeError(
            f"the {strategy} cannot make a graph of its backward (create_graph=True, second derivatives): its "
            "kernels' backward has no derivative. Fix: strategy='allgather', whose second derivatives are exact, "
            "or take first derivatives only"))
