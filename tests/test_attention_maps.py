"""attention_maps.affinity_rows against rows of the whole float64 affinity matrix (tests/oracle.py)."""
from __future__ import annotations

import pytest
import torch

from helpers import LargestTensor, assert_rel
from nonlocal_dist import MODES, NonLocalBlock
from nonlocal_dist.attention_maps import affinity_rows
from oracle import naive_affinity, naive_nonlocal, oracle_embed

# (layout, axes, sub_sample, shape, queries over the axes)
CASES = [
    ("b c t h w", None, {"h": 2, "w": 2}, (2, 8, 3, 6, 4), [(0, 0, 0), (2, 5, 3), (1, 2, 1)]),
    ("b c t h w", None, {"t": 2, "h": 2}, (1, 8, 4, 5, 3), [(3, 4, 2), (0, 1, 0)]),
    ("b c t h w", "t h", {"h": 3}, (2, 8, 3, 7, 2), [(2, 6), (0, 0)]),  # w folded into the batch
    ("b n c", None, {"n": 2}, (3, 9, 8), [(8,), (4,)]),
]


def _block(mode: str, sub_sample, layout: str, axes, heads: int = 2, use_scale: bool = True) -> NonLocalBlock:
    torch.manual_seed(3)
    block = NonLocalBlock(8, layout=layout, axes=axes, mode=mode, sub_sample=sub_sample, heads=heads,
                          use_scale=use_scale).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return block


def _oracle_rows(block: NonLocalBlock, x: torch.Tensor, queries) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the whole (N, M) affinity at the flat query indices, the keys' g, and y at the queries."""
    theta, phi, g, key_grid = oracle_embed(block, x)
    sizes = [x.shape[block.layout.names.index(a)] for a in block.layout.axes]
    flat = [0] * len(queries)
    for i, query in enumerate(queries):
        for v, size in zip(query, sizes):
            flat[i] = flat[i] * size + v
    f = naive_affinity(theta, phi, block.mode, block.scale, block.concat_weight)
    y = naive_nonlocal(theta, phi, g, block.mode, block.scale, block.concat_weight)
    return f[:, :, flat].unflatten(-1, key_grid), g, y[:, :, flat]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_rows_equal_the_whole_affinity_matrix(mode, case):
    layout, axes, sub_sample, shape, queries = CASES[case]
    block = _block(mode, sub_sample, layout, axes)
    x = torch.randn(*shape, dtype=torch.float64)
    rows = affinity_rows(block, x, queries)
    want, g, y = _oracle_rows(block, x, queries)
    assert rows.dtype == torch.float64
    assert_rel(rows, want, 1e-12, f"{mode} rows")
    # What the rows are for: they weight g_j, giving the block's y at the queries.
    assert_rel(rows.flatten(3) @ g, y, 1e-12, f"{mode} rows @ g")
    if mode in ("gaussian", "embedded_gaussian"):
        assert_rel(rows.flatten(3).sum(-1), torch.ones(rows.shape[:3], dtype=torch.float64), 1e-12, "softmax rows sum")


@pytest.mark.parametrize("mode", MODES)
def test_float32_rows_and_no_gradient_graph(mode):
    layout, axes, sub_sample, shape, queries = CASES[0]
    block = _block(mode, sub_sample, layout, axes).float()
    x = torch.randn(*shape, requires_grad=True)
    rows = affinity_rows(block, x, queries)
    assert rows.dtype == torch.float32 and not rows.requires_grad
    want, _, _ = _oracle_rows(block.double(), x.detach().double(), queries)
    assert_rel(rows, want, 1e-5, f"{mode} float32 rows")


@pytest.mark.parametrize("mode", MODES)
def test_rows_never_build_the_whole_matrix(mode):
    # 8 x 16 x 16 = 2048 query positions, 512 keys: the whole affinity has 1M elements.
    block = NonLocalBlock(16, mode=mode, sub_sample={"h": 2, "w": 2})
    x = torch.randn(1, 16, 8, 16, 16)
    with LargestTensor() as tracker:
        rows = affinity_rows(block, x, [(0, 0, 0), (7, 15, 15), (3, 8, 2)])
    assert rows.shape == (1, 1, 3, 8, 8, 8)
    # The block's own embed projects every position once (theta, phi, g: 1.5 x the size of x here);
    # the whole affinity would be 2048 x 512 = 32 x the size of x.
    assert tracker.numel <= 2 * x.numel(), f"{mode}: a tensor of {tracker.numel} elements (x has {x.numel()})"


@pytest.mark.parametrize(
    "queries, error, match",
    [
        ([], ValueError, "queries is empty"),
        ("0 0 0", TypeError, "queries must be a sequence"),
        (5, TypeError, "queries must be a sequence"),
        ([(0, 0)], ValueError, r"queries\[0\] = \(0, 0\): expected 3 indices, one per axis \(t, h, w\)"),
        ([(0, 0, 0), (0, 1.5, 0)], TypeError, r"queries\[1\] = \(0, 1.5, 0\): indices must be ints"),
        ([(True, 0, 0)], TypeError, "indices must be ints"),
        ([(0, 0, 4)], ValueError, r"index 4 on axis 'w' is outside 0..3; the query grid is \{'t': 3, 'h': 6, 'w': 4\}"),
        ([(-1, 0, 0)], ValueError, r"index -1 on axis 't' is outside 0..2"),
    ],
)
def test_query_validation(queries, error, match):
    block = NonLocalBlock(8, sub_sample={"h": 2, "w": 2})
    with pytest.raises(error, match=match):
        affinity_rows(block, torch.randn(1, 8, 3, 6, 4), queries)


def test_queries_as_a_tensor():
    block = _block("embedded_gaussian", {"h": 2, "w": 2}, "b c t h w", None)
    x = torch.randn(1, 8, 3, 6, 4, dtype=torch.float64)
    queries = [(2, 5, 3), (0, 1, 2)]
    assert torch.equal(affinity_rows(block, x, torch.tensor(queries)), affinity_rows(block, x, queries))
