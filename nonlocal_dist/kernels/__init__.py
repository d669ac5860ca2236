"""Single-device math of the non-local operation, one file per affinity family.

All kernels work on 4-D tensors ``(B, H, N, d)``; the public wrapper adds/removes the heads axis.
Nothing here knows about process groups.
"""
from __future__ import annotations

from nonlocal_dist.kernels.affinity import affinity_matrix, affinity_scores, normalise_scores
from nonlocal_dist.kernels.blocked_softmax import blocked_backward, blocked_forward
from nonlocal_dist.kernels.linear import dot_product_linear
from nonlocal_dist.kernels.reference import reference_nonlocal
from nonlocal_dist.kernels.softmax import (
    attention_backward,
    attention_forward,
    blocked_attention,
    preferred_chunk,
    sdpa_attention,
)
from nonlocal_dist.kernels.sorted_concat import concat_sorted

__all__ = [
    "affinity_matrix",
    "affinity_scores",
    "attention_backward",
    "attention_forward",
    "blocked_attention",
    "blocked_backward",
    "blocked_forward",
    "concat_sorted",
    "dot_product_linear",
    "normalise_scores",
    "preferred_chunk",
    "reference_nonlocal",
    "sdpa_attention",
]
