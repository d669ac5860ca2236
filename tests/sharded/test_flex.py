"""flex_attention on sharded q, k and v (``sharded.rules.flex``): forward against one process (torch's
flex attention has no backward on CPU, for one process as for ours), 2 and 3 ranks with uneven and
empty shards, with block masks, score mods, GQA and the log-sum-exp; a mod holding a sharded tensor is
refused on every rank; plain calls go to torch's own function."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

fa = pytest.importorskip("torch.nn.attention.flex_attention")

from nonlocal_dist import parallelize  # noqa: E402
from nonlocal_dist.sharded import ShardingRefusal  # noqa: E402
from nonlocal_dist.testing import run_ranks  # noqa: E402

HEADS, KV_HEADS, DIM = 4, 2, 16


def _causal(b, h, q, kv):
    return q >= kv


def _window(b, h, q, kv):
    return (q - kv).abs() <= 3


def _distance_bias(score, b, h, q, kv):
    return score - 0.1 * (q - kv).abs() + 0.05 * h


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (QB, KVB) bool block matrix in BlockMask's ordered form: counts (1, 1, QB), indices (1, 1, QB, KVB)."""
    order = dense.int().argsort(dim=-1, descending=True, stable=True)
    return dense.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]


def _block_sparse(n: int):
    """Blocks of 4 tokens, no mask_mod (as Kandinsky's NABLA masks): each query block takes the first
    block whole (a full block), itself, and for odd blocks the one before (partial blocks)."""
    blocks = -(-n // 4)
    eye = torch.eye(blocks, dtype=torch.bool)
    partial = eye | (eye.roll(-1, 1) & (torch.arange(blocks) % 2 == 1)[:, None])
    partial[:, 0] = False
    full = torch.zeros_like(partial)
    full[:, 0] = True
    return fa.BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=4, seq_lengths=(n, n))


class FlexLayer(nn.Module):
    """A DiT-style attention layer over tokens (b, n, c) whose kernel is flex_attention, called as
    diffusers' flex backend calls it (through the module, q/k/v as keywords)."""

    def __init__(self, mask_mod=None, score_mod=None, gqa: bool = False, lse: bool = False):
        super().__init__()
        kv_heads = KV_HEADS if gqa else HEADS
        self.q = nn.Linear(DIM, HEADS * 8)
        self.kv = nn.Linear(DIM, 2 * kv_heads * 8)
        self.out = nn.Linear(HEADS * 8, DIM)
        self.mask_mod, self.score_mod, self.gqa, self.lse, self.kv_heads = mask_mod, score_mod, gqa, lse, kv_heads

    def forward(self, x):
        q = self.q(x).unflatten(-1, (HEADS, 8)).transpose(1, 2)
        k, v = self.kv(x).unflatten(-1, (2, self.kv_heads, 8)).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None
        if self.mask_mod == "blocks":  # block-sparse, no mask_mod (Kandinsky's NABLA): blocks of 4 tokens
            mask = _block_sparse(q.shape[-2])
        elif self.mask_mod is not None:  # blocks of 4 tokens, so rank boundaries fall inside blocks
            mask = fa.create_block_mask(self.mask_mod, None, None, q.shape[-2], k.shape[-2], device="cpu",
                                        BLOCK_SIZE=4)
        y = fa.flex_attention(query=q, key=k, value=v, score_mod=self.score_mod, block_mask=mask,
                              enable_gqa=self.gqa, return_lse=self.lse)
        if self.lse:
            y, lse = y
            y = y * torch.sigmoid(lse)[..., None]  # the log-sum-exp used downstream, so its rows must be right
        return self.out(y.transpose(1, 2).flatten(2))


CASES = {
    "plain": {},
    "causal": {"mask_mod": _causal},
    "window+bias": {"mask_mod": _window, "score_mod": _distance_bias},
    "gqa+lse": {"mask_mod": _causal, "gqa": True, "lse": True},
    "block-sparse": {"mask_mod": "blocks"},
}


def _worker(rank, world, case, sizes):
    from nonlocal_dist.sharded.rules import flex

    torch.manual_seed(0)
    whole = FlexLayer(**CASES[case]).double()
    sharded = parallelize(copy.deepcopy(whole), dist.group.WORLD, "n", layout="b n c", sizes=[sizes])
    x = torch.randn(2, sum(sizes), DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = whole(x)
        seen, plain = [], flex._plain_flex
        flex._plain_flex = lambda q, *args, **kwargs: seen.append(q.shape[-2]) or plain(q, *args, **kwargs)
        try:
            got = sharded(x)
        finally:
            flex._plain_flex = plain
    return ((got - want).abs().max() / want.abs().max()).item(), seen


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("world,sizes", [(2, [7, 5]), (3, [5, 3, 4]), (3, [6, 0, 5])])
def test_flex_attention_matches_one_process(case, world, sizes):
    """Each rank attends with its own queries; with an empty rank, or a block mask whose sparsity its
    mask_mod does not express, every rank runs the whole call."""
    whole = case == "block-sparse" or 0 in sizes
    for rank, (err, seen) in enumerate(run_ranks(_worker, world, case, sizes, timeout=300)):
        assert err < 1e-14, err
        assert seen == [sum(sizes) if whole else sizes[rank]], seen


class ShardedBias(nn.Module):
    """A score_mod that indexes a per-token bias made from the sharded activation itself."""

    def forward(self, x):
        q = x[:, None]
        bias = x.sum(-1)  # (b, n), sharded along n

        def score_mod(score, b, h, qi, kv):
            return score + bias[b, kv]

        return fa.flex_attention(q, q, q, score_mod=score_mod)[:, 0]


def _refusal_worker(rank, world):
    model = parallelize(ShardedBias(), dist.group.WORLD, "n", layout="b n c")
    try:
        with torch.no_grad():
            model(torch.randn(1, 8, 16))
    except ShardingRefusal as exc:
        return str(exc)
    return None


def test_a_score_mod_holding_a_sharded_tensor_is_refused_on_every_rank():
    for message in run_ranks(_refusal_worker, 2, timeout=120):
        assert message is not None and "holds a sharded tensor" in message and "full_tensor" in message, message


def test_plain_calls_run_torchs_own_function():
    from nonlocal_dist.sharded.rules import flex

    assert fa.flex_attention is flex._flex and flex._plain_flex.__module__ == "torch.nn.attention.flex_attention"
    q = torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(fa.flex_attention(q, q, q), flex._plain_flex(q, q, q), rtol=0, atol=0)


def _edge_worker(rank, world):
    """q sharded along its head dim with values of another head size; a block mask made for other lengths."""
    from nonlocal_dist.sharded import distribute, full_tensor

    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=g) for _ in range(2))
    errors = {}
    for dv in (12, 4):
        v = torch.randn(1, 2, 6, dv, dtype=torch.float64, generator=g)
        qs = distribute(q, dist.group.WORLD, "b h n d", ("d",), sizes=[[5, 3]])
        with torch.no_grad():
            errors[dv] = (full_tensor(fa.flex_attention(qs, k, v)) - fa.flex_attention(q, k, v)).abs().max().item()
    qs = distribute(q, dist.group.WORLD, "b h n d", ("n",), sizes=[[2, 4]])
    mask = fa.create_block_mask(_causal, None, None, 8, 6, device="cpu", BLOCK_SIZE=4)  # made for 8 queries
    for name, query in (("one process", q), ("sharded", qs)):
        try:
            with torch.no_grad():
                fa.flex_attention(query, k, k, block_mask=mask)
        except (ValueError, RuntimeError) as exc:  # torch's own refusal (its type and words vary by version)
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def test_head_dim_shards_and_masks_of_other_lengths_behave_as_one_process():
    for errors in run_ranks(_edge_worker, 2, timeout=120):
        assert errors[12] < 1e-14 and errors[4] < 1e-14, errors
        assert "block_mask" in errors.get("one process", "") and errors.get("sharded") == errors["one process"], errors
