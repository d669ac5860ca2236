"""Causal attention over a sharded sequence, the load-balanced zigzag ring (``sequence.causal``):
exact against a float64 causal softmax materialised here, in one process (every simulated rank) and
through ``F.scaled_dot_product_attention(is_causal=True)`` on sharded tokens over 2 and 3 gloo
ranks (uneven and empty shards); and the work per rank balanced where contiguous shards are not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from nonlocal_dist.kernels import blocked_softmax
from nonlocal_dist.sequence.causal import (
    _step_parts,
    local_causal_ring_attention,
    zigzag_lengths,
)
from nonlocal_dist.testing import run_ranks


def causal_oracle(q, k, v, scale):
    """softmax over keys j <= i of scale q_i·k_j, times v, materialised in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    s = scale * q @ k.transpose(-1, -2)
    n = q.shape[-2]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _inputs(shape, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn((*shape[:-1], dv), generator=gen, dtype=torch.float64)
    dy = torch.randn((*shape[:-1], dv), generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dy)]


def _against_oracle(fn, q, k, v, dy, scale):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = fn(*leaves)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = causal_oracle(*ref_leaves, scale)
    ref.backward(dy.double())
    return max(rel_err(a, b) for a, b in zip([y, *(t.grad for t in leaves)], [ref, *(t.grad for t in ref_leaves)]))


@pytest.mark.parametrize("backend", ["auto", "blocked"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 3e-6)])
@pytest.mark.parametrize("n, world", [(1, 2), (3, 2), (7, 4), (16, 2), (33, 3), (40, 4), (9, 1)])
def test_local_zigzag_ring_matches_float64_causal_softmax(n, world, dtype, tol, backend):
    q, k, v, dy = _inputs((2, 3, n, 8), 5, dtype)
    err = _against_oracle(lambda *t: local_causal_ring_attention(*t, 0.3, world, backend), q, k, v, dy, 0.3)
    assert err < tol, (n, world, err)


def test_blocked_causal_kernel_across_query_blocks(monkeypatch):
    """The blocked kernel's causal mask follows each query block's offset (many blocks of a few rows)."""
    monkeypatch.setattr(blocked_softmax, "CPU_BLOCK_BUDGET", 3 * 16 * 6 * 20)  # 3 query rows per block
    q, k, v, dy = _inputs((1, 6, 20, 4), 4, torch.float64, seed=1)
    assert blocked_softmax.query_block_size(q, k) == 3
    err = _against_oracle(lambda *t: local_causal_ring_attention(*t, 0.5, 3, "blocked"), q, k, v, dy, 0.5)
    assert err < 1e-12, err


def _work(n: int, world: int, zigzag: bool) -> list[float]:
    """Query-key pairs each rank computes (a causal diagonal block counts half)."""
    if not zigzag:  # contiguous shards: rank r attends to ranks 0..r
        size = n // world
        return [size * size * (r + 0.5) for r in range(world)]
    first, held = zigzag_lengths(n, world)
    work = []
    for r in range(world):
        total = 0.0
        for o in range(world):
            parts = _step_parts(r, o, first, held[r], held[o])
            if parts is not None:
                rows, keys, causal = parts
                total += (rows.stop - rows.start) * (keys.stop - keys.start) * (0.5 if causal else 1.0)
        work.append(total)
    return work


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_balances_the_work_that_contiguous_shards_do_not(world):
    n = 64 * world
    zig, contiguous = _work(n, world, True), _work(n, world, False)
    assert sum(zig) == pytest.approx(sum(contiguous), rel=0.02)  # the same causal pairs, about n²/2
    assert max(zig) / min(zig) < 1.05, zig
    assert max(contiguous) / min(contiguous) == pytest.approx(2 * world - 1)


# ---------------------------------------------------------------------------------------------
# Through the sharded runtime: SDPA(is_causal=True) on tokens sharded over a gloo group.

_SIZES = {2: [[13, 6], [2, 17]], 3: [[5, 0, 14], [0, 19, 0]]}


def _sdpa_worker(rank, world, sizes, shape):
    import torch.distributed as dist

    from nonlocal_dist.sharded import distribute, full_tensor

    q, k, v, dy = _inputs(shape, shape[-1], torch.float64, seed=3)
    layout = "b h t c" if len(shape) == 4 else "b t c"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sharded = [distribute(t, dist.group.WORLD, layout, "t", sizes=[sizes]) for t in leaves]
    y = full_tensor(F.scaled_dot_product_attention(*sharded, is_causal=True))
    ((y * dy).sum() / world).backward()  # the loss on every rank of the whole output: divided by the group size
    grads = [t.grad.clone() for t in leaves]  # every rank's part of the gradient, summed
    for g in grads:
        dist.all_reduce(g)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=True)
    (ref * dy).sum().backward()
    return max(rel_err(a, b) for a, b in zip([y, *grads], [ref, *(t.grad for t in ref_leaves)]))


@pytest.mark.parametrize("shape", [(2, 3, 19, 8), (2, 19, 6)])
@pytest.mark.parametrize("world", [2, 3])
def test_causal_sdpa_on_sharded_tokens_runs_the_zigzag_ring_exactly(world, shape):
    for sizes in _SIZES[world]:
        for err in run_ranks(_sdpa_worker, world, sizes, shape, timeout=120):
            assert err < 1e-12, (sizes, err)


# ---------------------------------------------------------------------------------------------
# parallelize(strategy=) chooses the attention's strategy, or the form refuses it on every rank.


class _SelfAttention(torch.nn.Module):
    """Causal and full self-attention over the tokens of x (b, n, c), two heads."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True) + F.scaled_dot_product_attention(q, k, v)
        return y.transpose(1, 2).flatten(2)


def _strategy_worker(rank, world, strategy):
    import copy
    import sys

    import torch.distributed as dist

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "sharded"))
    from sharded_parity import runtime_log

    from nonlocal_dist.sharded import ShardingRefusal, parallelize

    torch.manual_seed(0)
    model = _SelfAttention().double()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sharded = parallelize(model, dist.group.WORLD, "n", layout="b n c", sizes=[[7, 4]], strategy=strategy)
    try:
        with runtime_log() as log:
            y = sharded(x)
    except ShardingRefusal as exc:
        return "refused", str(exc)
    return rel_err(y, plain(x)), any("gathered whole" in m for m in log)


@pytest.mark.parametrize("strategy", [None, "ring", "allgather", "ulysses"])
def test_parallelize_strategy_chooses_the_attention_strategy(strategy):
    results = run_ranks(_strategy_worker, 2, strategy, timeout=120)
    if strategy == "ulysses":  # the full attention could; the causal one runs ring or allgather only
        assert all(r[0] == "refused" and "causal attention" in r[1] and "'ulysses'" in r[1] for r in results), results
        return
    for err, gathered in results:
        assert err < 1e-12, results
        assert gathered == (strategy == "allgather"), results  # the ring gathers no keys


def _broadcast_worker(rank, world, sizes):
    """Multi-query attention written without an expand: k and v (b, 1, n, d) broadcast over q's heads."""
    import torch.distributed as dist

    from nonlocal_dist.sharded import distribute, full_tensor

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 1, 7, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sharded = [distribute(t, dist.group.WORLD, "b h t c", "t", sizes=[sizes]) for t in leaves]
    y = full_tensor(F.scaled_dot_product_attention(*sharded, is_causal=True))
    (y.sum() / world).backward()
    grads = [t.grad.clone() for t in leaves]
    for g in grads:
        dist.all_reduce(g)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=True)
    ref.sum().backward()
    return max(rel_err(a, b) for a, b in zip([y, *grads], [ref, *(t.grad for t in ref_leaves)]))


@pytest.mark.parametrize("sizes", [[4, 3], [7, 0]])
def test_causal_attention_with_broadcast_keys_runs_the_all_gather_exactly(sizes):
    for err in run_ranks(_broadcast_worker, 2, sizes, timeout=120):
        assert err < 1e-12, err
