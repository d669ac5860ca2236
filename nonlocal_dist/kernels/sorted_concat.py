"""Concatenation affinity in O((N + M) log M): ReLU(a_i + b_j) splits over sorted keys.

With ``a_i = w_θ·theta_i`` and ``b_j = w_φ·phi_j``, ``ReLU(a_i + b_j)`` is non-zero exactly for the
keys with ``a_i + b_j > 0``, so ``Σ_j ReLU(a_i + b_j) g_j = a_i Σ_{j∈S_i} g_j + Σ_{j∈S_i} b_j g_j``
with ``S_i = {j : -b_j < a_i}``: prefix sums over the keys sorted by ``-b`` (``step_sums``).

Every derivative is again a step sum with queries and keys exchanged (``F^T``), so autograd
composes them to any order (ReLU'(0) = 0 and ReLU'' = 0, as torch's), and ``torch.func``
transforms run through them. Non-finite a, b or g give the formula's NaN/inf pattern (what the
materialised ``ReLU(a_i + b_j) g_j`` summed in IEEE arithmetic gives): the prefix sums see finite
values only, and the non-finite terms are added back from per-column statistics.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.conventions import accumulation_dtype, all_finite


def concat_projections(theta: Tensor, phi: Tensor, concat_weight: Tensor) -> tuple[Tensor, Tensor]:
    """``a = theta·w_θ`` (B, H, N) and ``b = phi·w_φ`` (B, H, M); concat_weight (2d,) or (H, 2d)."""
    d = theta.shape[-1]
    w = concat_weight if concat_weight.dim() == 2 else concat_weight.expand(theta.shape[1], 2 * d)
    a = torch.einsum("bhnd,hd->bhn", theta, w[:, :d].to(theta.dtype))
    b = torch.einsum("bhmd,hd->bhm", phi, w[:, d:].to(phi.dtype))
    return a, b


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, h, index[b, h, k], :]`` for x (B, H, M, C) and index (B, H, K) -> (B, H, K, C).

    One ``index_select`` over the flattened rows: its backward is an ``index_add`` of whole rows,
    much faster than the scatter behind ``torch.gather`` with an expanded index.
    """
    b, h, m, c = x.shape
    offsets = torch.arange(b * h, device=x.device).view(b, h, 1) * m
    rows = x.reshape(b * h * m, c).index_select(0, (index + offsets).reshape(-1))
    return rows.view(*index.shape, c)


def exclusive_prefix_sum(x: Tensor, block: int = 128) -> Tensor:
    """``out[..., k, :] = Σ_{r<k} x[..., r, :]`` (..., M+1, C) for x (..., M, C), as blocked matmuls.

    ``torch.cumsum`` along a non-last axis is a slow serial loop on CPU (and so is its backward);
    a lower-triangular (block × block) matmul per block plus an exclusive scan of the block totals
    is the same sum, runs on BLAS, and its backward is matmuls again. x must be finite (the matmul
    multiplies every row by the zeros above the diagonal).
    """
    m = x.shape[-2]
    # A leading zero row turns the inclusive sum into the exclusive one; the tail fills the last block.
    columns = F.pad(x, (0, 0, 1, (-(m + 1)) % block)).unflatten(-2, (-1, block)).movedim(-2, 0)
    shape = columns.shape
    # One (block x block) @ (block x everything) GEMM: a broadcast matmul would expand tri per block.
    # The padded copy is dropped as soon as the GEMM has its operand (peak memory at large M).
    columns = columns.reshape(block, -1)
    tri = torch.ones(block, block, dtype=x.dtype, device=x.device).tril()
    within = (tri @ columns).view(shape).movedim(0, -2)
    del columns
    # The offset of block k is the sum of the totals before it: an exclusive scan, not the inclusive
    # scan minus the block's own total (that difference cancels digits when the totals grow).
    offsets = F.pad(torch.cumsum(within[..., :-1, -1, :], dim=-2), (0, 0, 1, 0))
    return (within + offsets.unsqueeze(-2)).flatten(-3, -2)[..., : m + 1, :]


class _StepSums(torch.autograd.Function):
    """``out_i = Σ_j [q_i + k_j > 0] v_j``; the derivative in v is the same sum with q and k
    exchanged, in q and k zero (the step is flat almost everywhere)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, order = torch.sort(-k, dim=-1)
        prefix = exclusive_prefix_sum(take_rows(v, order))
        count = torch.searchsorted(keys.contiguous(), q.contiguous(), side="left")
        return take_rows(prefix, count)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, _ = inputs
        ctx.save_for_backward(q, k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k = ctx.saved_tensors
        return None, None, step_sums(k, q, grad) if ctx.needs_input_grad[2] else None


def step_sums(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``Σ_j [q_i + k_j > 0] v_j`` (B, H, N, C) for q (B, H, N), k (B, H, M), v (B, H, M, C).

    q and k must have no NaN (±inf are fine), v must be finite (``exclusive_prefix_sum``).
    """
    return _StepSums.apply(q.detach(), k.detach(), v)


def _ieee_sum(mask: Tensor, factor: Tensor, g: Tensor) -> Tensor:
    """``Σ_{j: mask_j} factor_j · g_j`` in IEEE arithmetic (B, H, 1, dv); mask, factor (B, H, M)."""
    return torch.where(mask.unsqueeze(-1), factor.unsqueeze(-1) * g, 0).sum(-2, keepdim=True)


def _nan_if_any(mask: Tensor) -> Tensor:
    """NaN where some key of the row of (B, H, M) ``mask`` is set, else 0; (B, H, 1, 1)."""
    return torch.where(mask.any(-1), torch.nan, 0.0)[..., None, None]


@torch.no_grad()
def nonfinite_terms(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    """What non-finite a, b or g add to ``Σ_j ReLU(a_i + b_j) g_j`` beyond the finite part (B, H, N, dv).

    Zero where a, b and g are finite. The finite part counts finite keys with finite a only, and
    finite g entries only (``relu_sums``). ReLU(NaN) = NaN, 0·inf = NaN, inf - inf = NaN.
    """
    inf = torch.tensor(float("inf"), dtype=g.dtype, device=g.device)
    b_finite, b_nan = torch.isfinite(b), torch.isnan(b)
    g_bad = ~torch.isfinite(g)
    # Finite query rows: keys with b = +inf give inf·g_j, b = -inf give 0·g_j, NaN b give NaN.
    key_factor = torch.where(b_nan, torch.nan, torch.where(b > 0, inf, 0.0))
    column = _ieee_sum(~b_finite, key_factor, g)
    # Finite keys with a non-finite g_j: inf·sign or NaN if counted, 0·g_j = NaN if not; some key is
    # not counted for row i exactly when a_i + β ≤ 0, β the least b_j among those keys.
    bad_finite = g_bad & b_finite.unsqueeze(-1)
    counted = torch.where(bad_finite, g, 0).sum(-2, keepdim=True)
    beta = torch.where(bad_finite, b.unsqueeze(-1), inf).amin(-2, keepdim=True)
    a_col = a.unsqueeze(-1)
    terms = column + torch.where(a_col + beta <= 0, torch.nan, counted)
    # Rows with a = +inf: inf·g_j for every key with b > -inf, NaN for the others; a = -inf: 0·g_j
    # for b < inf, NaN for the others; a = NaN: NaN.
    plus_inf = _ieee_sum(b > -inf, inf.expand_as(b), g) + _nan_if_any((b == -inf) | b_nan)
    minus_inf = _ieee_sum(b < inf, torch.zeros_like(b), g) + _nan_if_any((b == inf) | b_nan)
    terms = torch.where(a_col == inf, plus_inf, terms)
    terms = torch.where(a_col == -inf, minus_inf, terms)
    return torch.where(torch.isnan(a_col), torch.nan, terms)


def _may_be_nonfinite(*tensors: Tensor) -> bool:
    """False only when every entry is finite: a sum is non-finite whenever one of its terms is (an
    overflowing sum of finite terms merely takes the exact non-finite path)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return True  # no data-dependent branch there: the non-finite path is exact for finite inputs too
    return not all_finite(*tensors)


def relu_sums(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    """``Σ_j ReLU(a_i + b_j) g_j`` (B, H, N, dv) for a (B, H, N), b (B, H, M), g (B, H, M, dv).

    Exact for finite inputs (sums in the inputs' dtype); the formula's NaN/inf pattern otherwise,
    with gradients through the finite part (non-finite terms are constants to autograd).
    """
    if not _may_be_nonfinite(a, b, g):
        return _finite_relu_sums(a, b, g, a, b)
    # Non-finite queries count no key and non-finite keys are never counted; non-finite g entries
    # count as zero: nonfinite_terms adds what they contribute.
    a_ok, b_ok = torch.isfinite(a), torch.isfinite(b)
    finite = _finite_relu_sums(
        torch.where(a_ok, a, 0), torch.where(b_ok, b, 0), torch.nan_to_num(g, 0.0, 0.0, 0.0),
        torch.where(a_ok, a, -torch.inf), torch.where(b_ok, b, -torch.inf),
    )
    return finite + nonfinite_terms(a, b, g)


def _finite_relu_sums(a: Tensor, b: Tensor, g: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """``a_i Σ_{j∈S_i} g_j + Σ_{j∈S_i} b_j g_j`` with ``S_i = {j : q_i + k_j > 0}``; a, b, g finite."""
    p_g, p_bg = step_sums(q, k, torch.cat([g, b.unsqueeze(-1) * g], dim=-1)).chunk(2, dim=-1)
    return torch.addcmul(p_bg, a.unsqueeze(-1), p_g)


def _own_keys(b: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return b, g


def concat_sorted(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    concat_weight: Tensor,
    gather_keys: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = _own_keys,
) -> Tensor:
    """``y_i = (1/M) Σ_j ReLU(w_θ·theta_i + w_φ·phi_j) g_j``, exact, without the (N, M) matrix.

    Shapes: theta (B, H, N, d), phi (B, H, M, d), g (B, H, M, dv), concat_weight (2d,) or (H, 2d)
    -> y (B, H, N, dv), in g's dtype; half-precision inputs are computed (and their prefix sums
    accumulated) in float32, with autocast off. ``gather_keys`` takes this block's key statistics
    b (B, H, M, 1) and g to those of all keys (sequence parallelism passes an all-gather).
    """
    out_dtype = g.dtype
    acc = accumulation_dtype(g.dtype)
    with torch.autocast(g.device.type, enabled=False):
        theta, phi, g, concat_weight = (t.to(acc) for t in (theta, phi, g, concat_weight))
        a, b = concat_projections(theta, phi, concat_weight)
        b, g = gather_keys(b.unsqueeze(-1), g)
        return (relu_sums(a, b.squeeze(-1), g) / b.shape[-2]).to(out_dtype)
