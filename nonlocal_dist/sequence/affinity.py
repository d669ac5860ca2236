"""Affinity rows of a few queries when the keys are sharded over a group (sequence parallelism).

Two steps, each one small collective on every rank in the same order: the query rows of theta are
summed from their owners (Q×d values), and the softmax normaliser's max and sum are all-reduced
(Q values each). The (Q, M) rows are never gathered whole before normalising: each rank
normalises its own key columns with the global statistics.
"""
from __future__ import annotations

from torch import Tensor

from nonlocal_dist.distributed.comm import all_reduce_max, all_reduce_sum
from nonlocal_dist.kernels.affinity import affinity_scores, normalise_scores


def share_query_rows(theta_rows: Tensor, group) -> Tensor:
    """Every query's theta row on every rank: (B, H, Q, d), each row filled on its owner, zero elsewhere."""
    return all_reduce_sum(theta_rows, group)


def sharded_affinity_rows(
    theta: Tensor,
    phi: Tensor,
    mode: str,
    scale: float,
    concat_weight: Tensor | None,
    group,
    key_sizes: list[int],
) -> Tensor:
    """This rank's columns (B, H, Q, M_r) of the rows ``f(theta_q, phi_j) / C(x)`` over every rank's keys.

    theta (B, H, Q, d) is the same on every rank; phi (B, H, M_r, d) is this rank's key shard and
    ``key_sizes[r]`` is M_r on rank r (C(x) = M = Σ M_r for dot product and concatenation).
    """
    scores = affinity_scores(theta, phi, mode, scale, concat_weight)
    return normalise_scores(
        scores, mode, sum(key_sizes),
        reduce_max=lambda t: all_reduce_max(t, group), reduce_sum=lambda t: all_reduce_sum(t, group),
    )
