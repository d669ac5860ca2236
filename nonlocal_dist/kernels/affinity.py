"""Normalised affinities ``f(x_i, x_j) / C(x)``: the weights that multiply ``g_j`` in the formula.

``affinity_scores`` gives the unnormalised scores of a block of queries against a block of keys;
``normalise_scores`` divides by ``C(x)``. The softmax normaliser needs the maximum and the sum over
*every* key: ``reduce_max`` / ``reduce_sum`` combine the per-block values when the keys are split
(sequence parallelism passes all-reduces; on one device they are the identity).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nonlocal_dist.conventions import SOFTMAX_MODES
from nonlocal_dist.kernels.sorted_concat import concat_projections


def affinity_scores(theta: Tensor, phi: Tensor, mode: str, scale: float, concat_weight: Tensor | None = None) -> Tensor:
    """Scores s (B, H, N, M) for theta (B, H, N, d), phi (B, H, M, d).

    Softmax modes: the logits ``s_ij = scale theta_i·phi_j``; ``dot_product``: ``f = theta_i·phi_j``;
    ``concatenation``: ``f = ReLU(w_θ·theta_i + w_φ·phi_j)`` with concat_weight (2d,) or (H, 2d).
    """
    if mode in SOFTMAX_MODES:
        return scale * theta @ phi.transpose(-1, -2)
    if mode == "dot_product":
        return theta @ phi.transpose(-1, -2)
    if mode == "concatenation":
        a, b = concat_projections(theta, phi, concat_weight)
        return torch.relu(a[..., :, None] + b[..., None, :])
    raise ValueError(f"unknown mode {mode!r}")


def _identity(x: Tensor) -> Tensor:
    return x


def normalise_scores(
    scores: Tensor,
    mode: str,
    num_keys: int,
    reduce_max: Callable[[Tensor], Tensor] = _identity,
    reduce_sum: Callable[[Tensor], Tensor] = _identity,
) -> Tensor:
    """``f_ij / C(x)`` (B, H, N, M) from ``affinity_scores`` over this block's keys.

    Softmax modes: ``exp(s_ij - max_k s_ik) / Σ_k exp(s_ik - max_k s_ik)`` with max and sum over all
    ``num_keys`` keys (``reduce_max``/``reduce_sum`` take this block's (B, H, N, 1) values to those of
    all keys); dot product and concatenation: ``f_ij / num_keys``.
    """
    if mode not in SOFTMAX_MODES:
        return scores / num_keys
    # The shift cancels in the ratio: detached, autograd does not route gradients through the max.
    row_max = reduce_max(scores.detach().amax(dim=-1, keepdim=True))
    weights = torch.exp(scores - row_max)
    return weights / reduce_sum(weights.sum(dim=-1, keepdim=True))


def affinity_matrix(theta: Tensor, phi: Tensor, mode: str, scale: float, concat_weight: Tensor | None = None) -> Tensor:
    """The full normalised affinity (B, H, N, M) on one device; shapes as ``affinity_scores``."""
    return normalise_scores(affinity_scores(theta, phi, mode, scale, concat_weight), mode, phi.shape[-2])
