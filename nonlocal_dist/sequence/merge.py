"""Pure log-sum-exp merge of partial softmax results (no communication)."""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.conventions import accumulation_dtype


def merge_partial(out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ``softmax`` results over disjoint key blocks, in float32 (or float64 for float64 inputs).

    ``out`` (B, H, N, dv) and ``lse`` (B, H, N) are the running result over the keys seen so far;
    ``new_lse = log(e^lse + e^block_lse)``, ``new_out = e^(lse-new_lse) out + e^(block_lse-new_lse) block_out``.
    ``out`` and ``block_out`` are overwritten (the caller owns both): no temporaries of their size.
    """
    acc = accumulation_dtype(block_out.dtype)
    block_out, block_lse = block_out.to(acc), block_lse.to(acc)
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out.mul_(torch.exp(block_lse - new_lse).unsqueeze(-1)))
    return out, new_lse
