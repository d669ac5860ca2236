"""Tokens that merge two sharded dims of a 2 x 2 mesh (issue 25, item 3): ``flatten`` of ``(t h w)``
with t over one mesh dim and h over the other. The merged dim is split over the mesh's span, each
rank holding its own frames of its t-line's tokens (no rank computes another's attention), and
splitting it back into ``(t, h, w)`` restores the two shards. Float64 on 4 gloo ranks, even and
uneven splits, against one process: outputs, input gradients and summed parameter gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sharded_parity import assert_parity, module_parity, reference
from torch import nn

from nonlocal_dist.testing import run_ranks


class SpacetimeAttention(nn.Module):
    """x (b, c, t, h, w): attention over the (t h w) tokens, back to a video, a residual, a 3-D conv."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.conv = nn.Conv3d(c, c, 3, padding=1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        y = F.scaled_dot_product_attention(self.q(tokens)[:, None], self.k(tokens)[:, None],
                                           self.v(tokens)[:, None])[:, 0]
        y = y.transpose(1, 2).unflatten(2, (t, h, w))
        return self.conv(y + x)


class FrameView(nn.Module):
    """Tokens (b, (t h w), c) read back as frames by ``view`` (MiniMax-H3's decoder head): the merged
    dim's split stays on whole frames, so the view needs no copy."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = self.proj(x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c))
        return tokens.view(b, t, h * w, c).sum(2)


class RowMLP(nn.Module):
    """An MLP over the (b t h w) rows, back to a video, then a residual: the rows merged over the mesh's
    span meet the video sharded over its dims (the video is gathered for the sum)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.lin(x.flatten(2).transpose(1, 2).reshape(-1, c)).reshape(b, t * h * w, c)
        return y.transpose(1, 2).reshape(b, c, t, h, w) + x


class OuterFrames(nn.Module):
    """Merged tokens times a per-frame summary of the video (an outer product over t)."""

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (b, n, c)
        frames = x.mean((3, 4)).transpose(1, 2)  # (b, t, c), t sharded
        return (tokens[:, :, None] * frames[:, None]).sum(2)


class TextJoint(SpacetimeAttention):
    """Text tokens joined before the merged video tokens, attention, split back (the record of the
    merge is lost in the join: the frames come back over the span, then meet the video)."""

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        joint = torch.cat([torch.ones(b, 3, c, dtype=x.dtype), tokens], dim=1)
        y = F.scaled_dot_product_attention(self.q(joint)[:, None], self.k(joint)[:, None],
                                           self.v(joint)[:, None])[:, 0]
        y = y[:, 3:].transpose(1, 2).reshape(b, c, t, h, w)
        return self.conv(y + x)


def _mesh(names=("t", "h")):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=names)


def _parity_worker(rank, world, cls, shape, names):
    return module_parity(cls, shape, _mesh(names), ("t", "h"))


@pytest.mark.parametrize("names", [("t", "h"), ("h", "t")], ids=["t-major", "h-major"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 6, 3), (1, 4, 5, 3, 2), (1, 4, 3, 4, 2)], ids=["even", "uneven", "t3"])
@pytest.mark.parametrize("cls", [SpacetimeAttention, FrameView, RowMLP, OuterFrames, TextJoint],
                         ids=["attention", "frame-view", "row-mlp", "outer-frames", "text-joint"])
def test_merging_two_sharded_dims_is_exact(cls, shape, names):
    """'h-major': t's mesh dim is the inner one, so the span's ranks do not run t-major: the merged
    dim falls back to t's group, h gathered (exact, the h ranks computing alike)."""
    assert run_ranks(_parity_worker, 4, cls, shape, names, timeout=240) == [True] * 4


def _split_worker(rank, world):
    import torch.distributed as dist

    from nonlocal_dist.sharded import distribute

    x = torch.randn(2, 3, 5, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xs = distribute(x, _mesh(), "b c t h w", ("t", "h"))
    tokens = xs.flatten(2)
    (dim, shard), = tokens.spec.dims
    back = tokens.unflatten(2, (5, 4, 2))
    return (dim, shard.sizes, dist.get_world_size(shard.group), tuple(tokens.to_local().shape),
            [(d, s.sizes) for d, s in back.spec.dims], bool(torch.equal(back.to_local(), xs.to_local())))


def test_merged_tokens_are_split_over_the_span_and_split_back():
    results = run_ranks(_split_worker, 4, timeout=120)
    # t = 5 over the t-lines as [3, 2] frames, each line's frames over its 2 h-ranks: [2, 1] and [1, 1],
    # 4 x 2 = 8 tokens a frame.
    for rank, (dim, sizes, span, local, back, equal) in enumerate(results):
        assert (dim, sizes, span) == (2, (16, 8, 8, 8), 4)
        assert local == (2, 3, sizes[rank])
        assert back == [(2, (3, 2)), (3, (2, 2))] and equal


def _strategy_worker(rank, world, strategy):
    from nonlocal_dist.sharded import ShardingRefusal

    mesh = _mesh()
    try:
        return module_parity(SpacetimeAttention, (1, 4, 4, 6, 3), mesh, ("t", "h"), strategy=strategy)
    except ShardingRefusal as exc:
        return str(exc)


def test_the_strategy_named_for_the_mesh_runs_the_merged_tokens():
    assert run_ranks(_strategy_worker, 4, "ring", timeout=240) == [True] * 4
    # One head over 4 ranks: Ulysses cannot split it, and says so on every rank.
    for message in run_ranks(_strategy_worker, 4, "ulysses", timeout=240):
        assert "strategy 'ulysses' with 1 heads over 4 ranks" in message, message


def _own_strategy_worker(rank, world):
    from nonlocal_dist import parallelize
    from nonlocal_dist.sharded import ShardingRefusal

    group = dist.group.WORLD
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 3, 3, dtype=torch.float64)
    one_head = parallelize(SpacetimeAttention().double(), group, "t", strategy="ulysses")  # 1 head: refused
    default = parallelize(SpacetimeAttention().double(), group, "t")  # parallelized after, on the same group
    ran = default(x).shape == x.shape  # its own (default) strategy, not the one named before
    try:
        one_head(x)
        refused = ""
    except ShardingRefusal as exc:
        refused = str(exc)
    return ran, refused, default(x).shape == x.shape


def test_each_model_keeps_its_own_strategy_on_a_shared_group():
    for ran, refused, again in run_ranks(_own_strategy_worker, 2, timeout=120):
        assert ran and again
        assert "strategy 'ulysses' with 1 heads over 2 ranks" in refused, refused


class Checkpointed(nn.Module):
    """SpacetimeAttention recomputed in backward (non-reentrant checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = SpacetimeAttention()

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def _interleaved_worker(rank, world):
    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = Checkpointed().double()
    x = torch.randn(1, 4, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = reference(copy.deepcopy(model), x)
    student = parallelize(model, dist.group.WORLD, "t")  # the default strategy (the all-gather: few keys)
    teacher = parallelize(SpacetimeAttention().double(), dist.group.WORLD, "t", strategy="ring")
    xr = x.clone().requires_grad_(True)
    out = student(xr)
    with torch.no_grad():
        teacher(x)  # another model, another strategy, between the student's forward and its recomputation
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    ((out * w).sum() / world).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in [*grads.values(), xr.grad]:
        dist.all_reduce(g)
    assert_parity(ref, (out.detach(), xr.grad, grads, {}))
    return True


def test_a_recomputation_keeps_its_models_strategy_when_another_model_ran_between():
    assert run_ranks(_interleaved_worker, 2, timeout=120) == [True, True]


class ShuffleConv(nn.Module):
    """pixel_unshuffle and pixel_shuffle over (h, w) sharded on a mesh, with a conv between them: pieces
    of one row or column leave layouts torch's shuffle kernels reject unless given standard strides."""

    def __init__(self, c: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4 * c, 4 * c, 3, padding=1)

    def forward(self, x):
        y = F.pixel_unshuffle(x.transpose(1, 2), 2).transpose(1, 2)
        y = self.conv(y)
        return F.pixel_shuffle(y.transpose(1, 2), 2).transpose(1, 2) + x


def _shuffle_worker(rank, world, shape):
    return module_parity(ShuffleConv, shape, _mesh(("h", "w")), ("h", "w"))


@pytest.mark.parametrize("shape", [(1, 2, 1, 2, 4), (1, 2, 2, 6, 4)])
def test_pixel_shuffle_on_a_mesh_is_exact(shape):
    assert run_ranks(_shuffle_worker, 4, shape, timeout=240) == [True] * 4
