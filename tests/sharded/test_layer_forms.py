"""The forms causal video VAEs and window transformers write their layers in (issue 25), in small modules,
unchanged code on 1-3 gloo ranks with uneven and empty shards, float64, against one process (outputs,
input gradients, summed parameter gradients):

- a first frame taken by an integer index (``x[:, :, 0]``, CogVideoX) or a squeeze (Hunyuan) and
  processed apart: its owner's frame gathered whole on every rank, then joined back in front;
- causal padding by ``repeat`` of the first frame (LTX) or a replicate ``F.pad`` (Hunyuan) before
  'valid' temporal convolutions, then a stride-2 one: the convolutions keep the shard boundaries
  (no drift onto the first rank), and the strided one reshards only where its grid needs it;
- frames folded into the batch (``(b t) c h w``: per-frame 2-D convs, group norms and attention);
- ops along unsharded dims (softmax, ``F.normalize``, ``cumsum``, ``repeat_interleave``) and
  ``F.normalize``/``repeat_interleave`` along the sharded one (a zero vector included);
- tokens flattened as ``(t h w)`` with h sharded: the shard moves to t, the outermost factor;
- Swin3D's shifted-window attention: ``roll`` along h and w, windows partitioned from t (sharded on
  the window grid) into the batch, ``q @ k.transpose(-2, -1)`` with a relative bias, softmax, ``@ v``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from sharded_parity import module_parity, runtime_log
from torch import nn

from nonlocal_dist.testing import run_ranks


class FirstFrameApart(nn.Module):
    """CogVideoX's temporal downsampling: the first frame kept, the rest average-pooled by 2."""

    def __init__(self, c: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        first, rest = x[:, :, 0], x[:, :, 1:]
        b, c, t, h, w = rest.shape
        rest = F.avg_pool1d(rest.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t), 2, 2)
        rest = rest.reshape(b, h, w, c, -1).permute(0, 3, 4, 1, 2)
        return torch.cat([self.conv(first)[:, :, None], rest], dim=2)


class SqueezedFirst(nn.Module):
    """Hunyuan's upsampling: the first frame squeezed and upsampled in space only, the rest in space and time."""

    def forward(self, x):
        first, rest = x.split([1, x.shape[2] - 1], dim=2)
        first = F.interpolate(first.squeeze(2), scale_factor=2, mode="nearest").unsqueeze(2)
        return torch.cat([first, F.interpolate(rest, scale_factor=2, mode="nearest")], dim=2)


class CausalChain(nn.Module):
    """Causal temporal convolutions, padded by ``repeat`` (LTX) and by replicate ``F.pad`` (Hunyuan),
    then a stride-2 causal one."""

    def __init__(self, c: int = 2) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv3d(c, c, (3, 1, 1)) for _ in range(3))
        self.down = nn.Conv3d(c, c, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            if i % 2:
                x = x + conv(F.pad(x, (0, 0, 0, 0, 2, 0), mode="replicate"))
            else:
                x = x + conv(torch.cat([x[:, :, :1].repeat(1, 1, 2, 1, 1), x], dim=2))
        return self.down(torch.cat([x[:, :, :1].repeat(1, 1, 2, 1, 1), x], dim=2))


class FramesFolded(nn.Module):
    """Per-frame layers on frames folded into the batch, and per-frame attention over (h w)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):
        b = x.shape[0]
        f = self.norm(self.conv(rearrange(x, "b c t h w -> (b t) c h w")))
        tokens = rearrange(f, "n c h w -> n (h w) c")
        q, k, v = self.qkv(tokens)[:, None].chunk(3, dim=-1)
        tokens = tokens + F.scaled_dot_product_attention(q, k, v)[:, 0]
        return rearrange(tokens, "(b t) (h w) c -> b c t h w", b=b, h=x.shape[3])


class AlongDims(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        y = y.softmax(1) + F.log_softmax(y, dim=1) + y.cumsum(dim=1)
        y = F.normalize(y, dim=1) + F.normalize(y, dim=2)  # over c, and over the sharded t
        return y.repeat_interleave(2, dim=2) + y.repeat_interleave(2, dim=1)[:, ::2].repeat_interleave(2, dim=2)


class NormalizeAcrossRanks(nn.Module):
    """``F.normalize`` along the sharded t, one vector of it all zeros (a finite gradient, as torch's)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c, c, 1)
        keep = torch.ones(1, c, 1, 3, 2)
        keep[0, 0, 0, 0, 0] = 0
        self.register_buffer("keep", keep)

    def forward(self, x):
        return F.normalize(self.conv(x) * self.keep, dim=2) + F.normalize(x, p=3.0, dim=2)


class FlattenedTokens(nn.Module):
    """A mid-block attention over ``(t h w)`` tokens (Hunyuan's VAE) on an activation sharded along h."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)
        q, k, v = self.qkv(tokens)[:, None].chunk(3, dim=-1)
        y = tokens + F.scaled_dot_product_attention(q, k, v)[:, 0]
        return y.unflatten(1, (t, h, w)).permute(0, 4, 1, 2, 3)


class ShiftedWindowAttention(nn.Module):
    """Swin3D-style: (b, c, t, h, w), windows of 2 x 2 x 2 tokens, shifted by one along h and w."""

    def __init__(self, c: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.bias = nn.Parameter(torch.randn(heads, 8, 8))

    def forward(self, x):
        x = torch.roll(x.permute(0, 2, 3, 4, 1), shifts=(-1, -1), dims=(2, 3))
        b, t, h, w, c = x.shape
        win = x.view(b, t // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, 8, c)
        q, k, v = self.qkv(win).reshape(win.shape[0], 8, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1) + self.bias).softmax(-1)
        y = self.proj((attn @ v).transpose(1, 2).reshape(win.shape[0], 8, c))
        y = y.view(b, t // 2, h // 2, w // 2, 2, 2, 2, c).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, h, w, c)
        return torch.roll(y, shifts=(1, 1), dims=(2, 3)).permute(0, 4, 1, 2, 3)


CASES = {  # name -> (module, input shape, axis)
    "first_frame_apart": (FirstFrameApart, (1, 2, 9, 3, 2), "t"),
    "squeezed_first": (SqueezedFirst, (1, 2, 5, 3, 2), "t"),
    "causal_chain": (CausalChain, (1, 2, 8, 3, 2), "t"),
    "frames_folded": (FramesFolded, (1, 4, 5, 3, 2), "t"),
    "along_dims": (AlongDims, (1, 4, 5, 3, 2), "t"),
    "normalize_across_ranks": (NormalizeAcrossRanks, (1, 4, 5, 3, 2), "t"),
    "flattened_tokens": (FlattenedTokens, (1, 4, 3, 5, 2), "h"),
    "shifted_windows": (ShiftedWindowAttention, (1, 8, 6, 4, 4), "t"),
}
SIZES = {1: lambda n: [[n]], 2: lambda n: [[n - n // 3, n // 3]], 3: lambda n: [[1, n - 1, 0]]}
WINDOW_SIZES = {1: [[6]], 2: [[4, 2]], 3: [[2, 4, 0]]}  # on the window grid of 2 frames


def _worker(rank, world, name):
    import torch.distributed as dist

    cls, shape, axis = CASES[name]
    sizes = WINDOW_SIZES[world] if name == "shifted_windows" else SIZES[world](shape[2 if axis == "t" else 3])
    return module_parity(cls, shape, dist.group.WORLD, axis, sizes=sizes)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_vae_layer_forms_are_exact(name, world):
    assert run_ranks(_worker, world, name, timeout=120) == [True] * world


def _no_drift_worker(rank, world):
    """Causal convolutions keep the shard lengths: on [4, 4] frames the stride-2 one finds its grid
    (outputs [2, 2]) with no reshard logged."""
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = parallelize(CausalChain().double(), dist.group.WORLD, "t", sizes=[[4, 4]], output="local")
    with runtime_log() as messages:
        local = model(torch.randn(1, 2, 8, 3, 2, dtype=torch.float64))
    return local.shape[2], [m for m in messages if "resharded" in m]


def test_causal_convolutions_keep_the_shard_boundaries():
    assert run_ranks(_no_drift_worker, 2, timeout=120) == [(2, [])] * 2


def _stray_shards_worker(rank, world):
    """A right operand of ``@`` sharded along a batch dim the left one keeps whole, and a value sharded
    along a dim its target keeps whole: gathered, not used as the local part."""
    import torch.distributed as dist

    from nonlocal_dist import distribute
    from nonlocal_dist.sharded.distribute import full_tensor

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, dtype=torch.float64, generator=g), torch.randn(3, 5, 3, dtype=torch.float64, generator=g)
    product = full_tensor(distribute(a, dist.group.WORLD, "b n c", "n", sizes=[[3, 1]])
                          @ distribute(b, dist.group.WORLD, "b n c", "b", sizes=[[2, 1]]))
    x, v = torch.randn(4, 7, dtype=torch.float64, generator=g), torch.randn(4, 7, dtype=torch.float64, generator=g)
    target = distribute(x, dist.group.WORLD, "n c", "c", sizes=[[5, 2]])
    target[:, 1:] = distribute(v, dist.group.WORLD, "n c", "n", sizes=[[3, 1]])[:, 1:]
    x[:, 1:] = v[:, 1:]
    return (product - a @ b).abs().max().item(), (full_tensor(target) - x).abs().max().item()


def test_operands_sharded_where_the_target_is_whole_are_gathered():
    assert run_ranks(_stray_shards_worker, 2, timeout=120) == [(0.0, 0.0)] * 2
