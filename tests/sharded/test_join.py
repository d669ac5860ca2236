"""Joins and splits along a sharded dim (issue 25, item 1), and the index forms real models use
(assignments into unsharded dims, ``...`` slices, ``type_as``), unchanged model code on 1-3 gloo ranks with
uneven shards, float64, against one process: outputs, input gradients and summed parameter gradients.

- joint text+video tokens (HunyuanVideo, CogVideoX): ``cat([text, video], dim=1)``, attention over
  the joint sequence, then ``split`` back: the text goes to the first rank, no exchange;
- a class token before and after the tokens, ``chunk`` along the tokens and a re-join with a whole
  part in the middle (an even reshard, one all-to-all per sharded part);
- causal first-frame padding written as ``cat`` along t (CogVideoX's VAE), or as the first frame
  ``expand``-ed to k - 1 frames (KVAE), then a temporal conv; its output written in parts into a
  plain ``torch.empty`` buffer of the global shape (KVAE, Kandinsky 6), which becomes sharded.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sharded_parity import module_parity, runtime_log, sharded_run
from torch import nn

from nonlocal_dist.testing import run_ranks


class JointTextVideo(nn.Module):
    """x (b, n, c) video tokens; text tokens held whole by every rank."""

    def __init__(self, c: int = 8, text: int = 3) -> None:
        super().__init__()
        self.text = nn.Parameter(torch.randn(1, text, c))
        self.proj = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)

    def forward(self, x):
        text = self.text.expand(x.shape[0], -1, -1)
        joint = torch.cat([text, x], dim=1)
        q, k, v = self.proj(joint).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        joint = joint + self.out(y)
        text_out, video = joint.split([text.shape[1], x.shape[1]], dim=1)
        return video + text_out.mean(1, keepdim=True)


class ClassTokens(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.mid = nn.Parameter(torch.randn(1, 2, c))
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        b = x.shape[0]
        y = torch.cat([self.cls.expand(b, -1, -1), x, self.cls.expand(b, -1, -1)], dim=1)
        front, back = y.chunk(2, dim=1)
        z = torch.cat([back, self.mid.expand(b, -1, -1), torch.tanh(front)], dim=1)
        return self.lin(z)


class CausalPad(nn.Module):
    """x (b, c, t, h, w): the first frame repeated twice in front, then a kernel-3 temporal conv."""

    def __init__(self, c: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c, 4, (3, 1, 1))

    def forward(self, x):
        first = x[:, :, :1]
        return self.conv(torch.cat([first, first, x], dim=2))


class CausalPadExpand(CausalPad):
    """KVAE's cached causal conv: the first frame expanded to the kernel's k - 1 frames in front."""

    def forward(self, x):
        first = x[:, :, :1]
        shape = list(first.shape)
        shape[2] = 2
        return self.conv(torch.cat([first.expand(shape), x], dim=2))


class CachedCausalConv(CausalPad):
    """KVAE's and Kandinsky 6's cached causal conv: a plain ``torch.empty`` buffer of the global shape,
    written in two parts (the frames after the padding, then the rest)."""

    def forward(self, x):
        b, _, t, h, w = x.shape
        first = x[:, :, :1]
        padded = torch.cat([first.expand(-1, -1, 2, -1, -1), x], dim=2)
        out = torch.empty(b, 4, t, h, w, dtype=x.dtype)
        out[:, :, :1] = self.conv(padded[:, :, :3])
        out[:, :, 1:] = self.conv(padded[:, :, 1:])
        return out


class Rotary(nn.Module):
    """A rotary embedding written as Wan writes it (``out[..., 0::2] = ...`` into ``empty_like``), a
    ``...`` slice, and ``type_as`` and ``to`` of tensors of other shapes (sharded and whole)."""

    def __init__(self, c: int = 8, n: int = 7) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.register_buffer("cos", torch.randn(1, n, c // 2))
        self.register_buffer("sin", torch.randn(1, n, c // 2))

    def forward(self, x):
        h = self.lin(x)
        x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(h)
        out[..., 0::2] = x1 * self.cos - x2 * self.sin
        out[..., 1::2] = x1 * self.sin + x2 * self.cos
        return out[..., 1:].type_as(h.unsqueeze(2)).to(self.cos.unsqueeze(0)).to(h[:, :1]) * 2


class Casts(nn.Module):
    """``Tensor.to`` of tensors: to a whole float32 tensor of another shape and back (``copy=True``),
    and a whole parameter cast to a sharded activation's type (the result stays whole)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.gain = nn.Parameter(torch.randn(c))

    def forward(self, x):
        h = self.lin(x)
        low = h.to(torch.zeros(3, dtype=torch.float32), non_blocking=False)
        return low.to(h, copy=True) * self.gain.to(h)


class MaskedSelfAttention(nn.Module):
    """Self-attention over the sharded tokens with a key padding mask, causal, and grouped heads: the
    keys and values are gathered whole, each rank's queries use their rows of the mask."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 2 * c)
        self.register_buffer("keep", torch.tensor([[True] * 5 + [False, True]] * 2))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split([8, 4, 4], dim=-1)
        q = q.view(b, n, 4, 2).transpose(1, 2)
        k, v = (t.reshape(b, n, 2, 2).transpose(1, 2) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep[:, None, None, :], enable_gqa=True)
        y = y + F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, n, 8)


class Refold(nn.Module):
    """Tokens regrouped by a reshape whose factor does not divide the shard lengths (7 + 5 tokens into
    frames of 4): the runtime reshards onto the frame grid, then reshapes."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        frames = self.lin(x).reshape(b, n // 4, 4, c)
        return (frames - frames.mean(2, keepdim=True)).reshape(b, n, c)


class RegisterTokens(nn.Module):
    """Register tokens (whole) and a class token sliced off the tokens (held by the first rank) joined
    after the tokens (MiniMax-H3's VAE decoder): the class token moves to the last rank, the tokens
    keep their split."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.registers = nn.Parameter(torch.randn(1, 2, c))
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        cls = torch.zeros_like(x[:, :1, :]) + x[:, :1, :].mean()
        joint = self.lin(torch.cat([x, self.registers.expand(b, -1, -1), cls], dim=1))
        return joint[:, :n] * joint[:, n:].mean(1, keepdim=True)


class TextPerFrame(nn.Module):
    """Latte's spatial cross-attention: frames folded into the batch (``(b t) (h w) c`` queries) against
    text tokens every rank holds, repeated per frame; and attention over a replicated summary."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.text = nn.Parameter(torch.randn(1, 3, c))
        self.q = nn.Linear(c, c)

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        text = self.text.repeat_interleave(b * t, dim=0)
        y = F.scaled_dot_product_attention(self.q(tokens)[:, None], text[:, None], text[:, None])[:, 0]
        summary = x.mean(dim=(2, 3, 4))[:, None, None, :]  # replicated
        y = y + F.scaled_dot_product_attention(summary, summary, summary)[:, 0]
        return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class AudioVideo(nn.Module):
    """Two streams (LTX-2, Motif-Video): audio tokens every rank holds whole attend to the sharded video
    tokens (whole queries against sharded keys, with a mask over the keys); the video attends to text
    joined to it, normalised and sliced back out (keys and values held by the last rank)."""

    def __init__(self, c: int = 8, audio: int = 3, text: int = 2) -> None:
        super().__init__()
        self.audio, self.text = nn.Parameter(torch.randn(1, audio, c)), nn.Parameter(torch.randn(1, text, c))
        self.q, self.kv, self.norm = nn.Linear(c, c), nn.Linear(c, 2 * c), nn.LayerNorm(c)

    def forward(self, x):
        b, n, _ = x.shape
        k, v = self.kv(x).chunk(2, dim=-1)
        keep = torch.arange(n) % 3 != 1
        heard = F.scaled_dot_product_attention(self.q(self.audio.expand(b, -1, -1))[:, None], k[:, None], v[:, None],
                                               attn_mask=keep[None])[:, 0]
        joint = self.norm(torch.cat([x, self.text.expand(b, -1, -1)], dim=1))
        text = joint[:, -self.text.shape[1]:]
        seen = F.scaled_dot_product_attention(self.q(joint[:, :n])[:, None], text[:, None], text[:, None])[:, 0]
        return seen + heard.mean(dim=1, keepdim=True)


class LinearAttention(nn.Module):
    """Sana-Video's ReLU linear attention, channels first (b, heads, c, n): key-value statistics summed
    over the sharded tokens (``value @ key^T``, ``key.sum``), then applied to each token's query."""

    def __init__(self, c: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(c, 3 * c)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).permute(0, 2, 3, 1) for t in F.relu(self.qkv(x)).chunk(3, -1))
        z = 1 / (k.sum(dim=-1, keepdim=True).transpose(-2, -1) @ q + 1e-15)
        scores = torch.matmul(v, k.transpose(-1, -2))
        y = torch.matmul(scores, q) * z
        return y.flatten(1, 2).transpose(1, 2)


class ComplexRotary(nn.Module):
    """A rotary embedding written with complex products (AnyFlow, SANA-WM): channel pairs viewed as
    complex numbers, times a whole-length table of unit phases, viewed back as real pairs."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.q = nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        phases = torch.polar(torch.ones(n, c // 2, dtype=x.dtype), torch.arange(n * c // 2, dtype=x.dtype).view(n, -1) / 7)
        return torch.view_as_real(torch.view_as_complex(self.q(x).unflatten(-1, (-1, 2))) * phases).flatten(2)


class PackedRows(nn.Module):
    """MiniMax-H3's packed sequence: text and video rows copied into one buffer by index (``index_copy``),
    a second copy of the video added in reversed order (``index_add``), the video rows selected back."""

    def __init__(self, c: int = 8, text: int = 3) -> None:
        super().__init__()
        self.text, self.proj, self.mix = nn.Parameter(torch.randn(1, text, c)), nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        t = self.text.shape[1]
        video = torch.arange(t, t + n)
        rows = self.text.new_zeros(b, t + n, c).index_copy(1, torch.arange(t), self.text.expand(b, -1, -1))
        rows = rows.index_copy(1, video, self.proj(x)).index_add(1, video.flip(0), x, alpha=0.5)
        return self.mix(rows).index_select(1, video)


class ValuesFirstAttention(nn.Module):
    """Attention written by hand channels-first, values on the left (LTX-2's audio VAE mid-block):
    ``attn = softmax(q^T k)``, then ``bmm(v, attn^T)``."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Conv1d(c, c, 1), nn.Conv1d(c, c, 1), nn.Conv1d(c, c, 1)

    def forward(self, x):  # (b, c, n)
        attn = torch.bmm(self.q(x).permute(0, 2, 1), self.k(x)) * x.shape[1] ** -0.5
        return x + torch.bmm(self.v(x), attn.softmax(dim=2).permute(0, 2, 1))


class BackwardScan(nn.Module):
    """SANA-WM's backward stream (x: b n c): the tokens flipped, shifted by one (``narrow``, a zero token in
    front), a causal depthwise conv over them, flipped back; key norms over the channels and over the
    tokens (``linalg.vector_norm``, p = 2 and inf); a roll along the tokens (positions wrap across ranks)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, groups=c)

    def forward(self, x):
        shifted = torch.cat([torch.zeros_like(x[:, :1]), x.flip(1).narrow(1, 0, x.shape[1] - 1)], dim=1)
        scanned = self.conv(F.pad(shifted.transpose(1, 2), (2, 0))).transpose(1, 2).flip(1)
        norms = (torch.linalg.vector_norm(x, dim=2, keepdim=True) + torch.linalg.vector_norm(x, dim=1, keepdim=True)
                 + torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True))
        return scanned * norms + x.roll(2, 1) + torch.fliplr(x)


class CausalLinearAttention(nn.Module):
    """Causal linear attention over the tokens (x: b n c) written with prefix sums: the key-value
    statistics and the key sums accumulated by ``cumsum`` along the sharded tokens; a decay gate by
    ``cumprod_`` (in place), a running log-normaliser by ``logcumsumexp``; sorted scores summed in place
    along the channels (``cumsum_``)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):
        q, k, v = F.elu(self.qkv(x)).add(1).chunk(3, dim=-1)
        kv = (k[..., :, None] * v[..., None, :]).cumsum(dim=1)  # (b, n, c, c)
        num = (q[..., :, None] * kv).sum(-2)
        den = (q * k.cumsum(1)).sum(-1, keepdim=True)
        decay = (torch.sigmoid(x) + 0.0).cumprod_(dim=1)  # in place, along the sharded tokens
        ranked = torch.softmax(x, -1).sort(-1).values.cumsum_(-1)  # in place along channels (Kandinsky's NABLA)
        return num / den * decay + torch.logcumsumexp(x, dim=1) + ranked


class AttentionPooling(nn.Module):
    """Attention pooling over the sharded tokens (x: b n c): softmax of per-token scores along the
    tokens, the weighted sum (replicated), and log_softmax along them broadcast back."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.score = nn.Linear(c, 2)

    def forward(self, x):
        weights = torch.softmax(self.score(x), dim=1)  # (b, n, 2)
        pooled = torch.einsum("bnk,bnc->bkc", weights, x)
        return x * pooled.mean(1, keepdim=True) + F.log_softmax(x, dim=1)


class FirstFrameContext(nn.Module):
    """I2VGen-XL's image context (x: b c t h w): the first frame (held by one rank) folded into a batch of
    two and through a conv and an adaptive pool, repeated per frame, then attended to by every frame's
    tokens folded into the batch (the keys' rows split otherwise than the queries': resharded)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.q = nn.Linear(c, c)

    def forward(self, x):
        b, c, t, h, w = x.shape
        first = x[:, :, :1].permute(0, 2, 1, 3, 4).reshape(b * 1, c, h, w)
        context = F.adaptive_avg_pool2d(self.conv(first), 2).flatten(2).transpose(1, 2)  # (b, 4, c)
        context = context.repeat_interleave(t, dim=0)  # (b t, 4, c)
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        y = F.scaled_dot_product_attention(self.q(tokens), context, context)
        return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class PackedJointSequence(nn.Module):
    """Cosmos 3's packing (x: b n c): timestep embeddings added to every other token by ``scatter_add``
    along the sharded tokens (whole index and source), then the tokens written into a plain joint
    buffer at tensor indices after three text rows (gathered: replicated from there)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.embed = nn.Parameter(torch.randn(4, c))

    def forward(self, x):
        n, c = x.shape[1], x.shape[2]
        tokens = self.lin(x[0])  # (n, c), sharded along the tokens
        index = torch.arange(0, n, 2)[:, None].expand(-1, c)  # every other token
        tokens = tokens.scatter_add(0, index, self.embed[: index.shape[0]])
        joint = tokens.new_zeros(3 + n, c)
        joint[torch.arange(3, 3 + n)] = tokens
        return x * joint.sum(0) + tokens


CASES = {
    "packed_joint_sequence": (PackedJointSequence, (2, 7, 8), "b n c", "n"),
    "first_frame_context": (FirstFrameContext, (2, 4, 7, 3, 2), "b c t h w", "t"),
    "attention_pooling": (AttentionPooling, (2, 7, 8), "b n c", "n"),
    "causal_linear_attention": (CausalLinearAttention, (2, 7, 8), "b n c", "n"),
    "backward_scan": (BackwardScan, (2, 7, 8), "b n c", "n"),
    "audio_video": (AudioVideo, (2, 7, 8), "b n c", "n"),
    "values_first_attention": (ValuesFirstAttention, (2, 4, 7), "b c n", "n"),
    "packed_rows": (PackedRows, (2, 7, 8), "b n c", "n"),
    "complex_rotary": (ComplexRotary, (2, 7, 8), "b n c", "n"),
    "linear_attention": (LinearAttention, (2, 7, 8), "b n c", "n"),
    "register_tokens": (RegisterTokens, (2, 7, 8), "b n c", "n"),
    "text_per_frame": (TextPerFrame, (1, 4, 7, 2, 3), "b c t h w", "t"),
    "masked_self_attention": (MaskedSelfAttention, (2, 7, 8), "b n c", "n"),
    "refold": (Refold, (2, 12, 8), "b n c", "n"),
    "rotary": (Rotary, (2, 7, 8), "b n c", "n"),
    "casts": (Casts, (2, 7, 8), "b n c", "n"),
    "joint_text_video": (JointTextVideo, (2, 7, 8), "b n c", "n"),
    "class_tokens": (ClassTokens, (2, 7, 8), "b n c", "n"),
    "causal_pad": (CausalPad, (1, 2, 7, 3, 2), "b c t h w", "t"),
    "causal_pad_expand": (CausalPadExpand, (1, 2, 7, 3, 2), "b c t h w", "t"),
    "cached_causal_conv": (CachedCausalConv, (1, 2, 7, 3, 2), "b c t h w", "t"),
}
SIZES = {1: [[7]], 2: [[5, 2]], 3: [[1, 6, 0]]}
REFOLD_SIZES = {1: [[12]], 2: [[7, 5]], 3: [[5, 7, 0]]}  # off the grid of 4


def _worker(rank, world, name):
    import torch.distributed as dist

    cls, shape, layout, axis = CASES[name]
    sizes = (REFOLD_SIZES if name == "refold" else SIZES)[world]
    return module_parity(cls, shape, dist.group.WORLD, axis, layout=layout, sizes=sizes)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_joins_and_splits_along_the_sharded_dim_are_exact(name, world):
    assert run_ranks(_worker, world, name, timeout=120) == [True] * world


def _every_rank_has_every_gradient(rank, world):
    """A rank holding no part of a whole operand still has its (zero) gradient, not None: optimizers and
    gradient reductions see the same parameters on every rank."""
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = parallelize(ClassTokens().double(), dist.group.WORLD, "n", layout="b n c", sizes=SIZES[world])
    model(torch.randn(2, 7, 8, dtype=torch.float64)).sum().backward()
    return sorted(n for n, p in model.named_parameters() if p.grad is None)


def test_every_rank_gets_every_parameter_gradient():
    assert run_ranks(_every_rank_has_every_gradient, 3, timeout=120) == [[]] * 3


class Rejoin(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        front, back = x.split([4, 3], dim=1)
        return self.lin(torch.cat([back, front], dim=1))


def _logged_worker(rank, world):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = Rejoin().double()  # its own call site: the pooled ranks may have logged ClassTokens' already
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    with runtime_log() as messages:
        sharded_run(model, x, dist.group.WORLD, "n", layout="b n c", sizes=SIZES[world], steps=3)
    return messages


class RegisterTokensAgain(RegisterTokens):
    def forward(self, x):  # its own call site: the pooled ranks may have logged RegisterTokens' already
        cls = torch.zeros_like(x[:, :1, :])
        joint = self.lin(torch.cat([x, self.registers.expand(x.shape[0], -1, -1), cls], dim=1))
        return joint[:, :x.shape[1]]


def _register_worker(rank, world):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = RegisterTokensAgain().double()
    with runtime_log() as messages:
        sharded_run(model, torch.randn(2, 7, 8, dtype=torch.float64), dist.group.WORLD, "n", layout="b n c",
                    sizes=SIZES[world])
    return messages


def test_a_part_held_by_one_rank_moves_to_its_side_of_the_join():
    """The class token (one position) moves; the tokens are not resharded evenly."""
    for messages in run_ranks(_register_worker, 2, timeout=120):
        assert any("moved to rank 1" in m for m in messages) and not any("even split" in m for m in messages), messages


def test_a_reshard_is_logged_once_per_call_site_with_its_bytes():
    for messages in run_ranks(_logged_worker, 2, timeout=120):
        assert len(messages) == 1, messages
        assert "resharded to an even split" in messages[0] and "bytes" in messages[0] and "test_join.py" in messages[0]


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens every rank holds whole (Wan, LTX-Video): a padding mask over
    the text keys, a per-query mask, and grouped-query heads."""

    def __init__(self, c: int = 8, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, c // heads
        self.q, self.kv = nn.Linear(c, c), nn.Linear(c, 2 * kv_heads * self.d)
        self.out = nn.Linear(c, c)

    def forward(self, x, text, keep, rows):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.d).transpose(1, 2)
        k, v = self.kv(text).view(b, text.shape[1], 2 * self.kv_heads, self.d).transpose(1, 2).chunk(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)
        y = y + F.scaled_dot_product_attention(q, k, v, attn_mask=rows[:, None], enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


def _cross_worker(rank, world):
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = CrossAttention().double()
    plain = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    text = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    rows = torch.randn(2, 7, 5, dtype=torch.float64, generator=gen)  # an additive bias per query and key
    w = torch.randn(2, 7, 8, dtype=torch.float64, generator=gen)
    ref = plain(x, text, keep, rows)
    ref_grads = torch.autograd.grad((ref * w).sum(), [x, text, *plain.parameters()])
    sharded = parallelize(model, dist.group.WORLD, "n", layout="b n c", inputs=("x",), sizes=SIZES[world])
    out = sharded(x, text, keep, rows)
    grads = [g.contiguous() for g in torch.autograd.grad((out * w).sum() / world, [x, text, *model.parameters()])]
    for g in grads:
        dist.all_reduce(g)
    return max([(out - ref).abs().max().item()] + [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_cross_attention_to_whole_text_keys_is_exact(world):
    for err in run_ranks(_cross_worker, world, timeout=120):
        assert err < 1e-12, err


class WritesItsBuffer(nn.Module):
    """Sharded values written into the model's own buffer: its state, never made an activation's shard.
    The values are gathered and the buffer written whole on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2, 7, 3, 2, dtype=torch.float64))

    def forward(self, x):
        self.cache[:, :, :] = x * 2
        return x


def _buffer_worker(rank, world):
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    model = parallelize(WritesItsBuffer(), dist.group.WORLD, "t", sizes=SIZES[world])
    x = torch.randn(1, 2, 7, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model(x)
    return (model.cache - x * 2).abs().max().item(), tuple(model.cache.shape), type(model.cache).__name__


@pytest.mark.parametrize("world", [2, 3])
def test_a_models_buffer_is_never_made_a_shard(world):
    for err, shape, kind in run_ranks(_buffer_worker, world, timeout=120):
        assert err == 0 and shape == (1, 2, 7, 3, 2) and kind == "Tensor", (err, shape, kind)


class StaleView(CausalPad):
    """A view of a plain buffer taken before sharded values are written into it: the buffer cannot
    become a shard in place (the view would keep reading the old storage), so the values are written
    whole (gathered) and the view reads them."""

    def forward(self, x):
        out = torch.zeros(1, 4, 7, 3, 2, dtype=x.dtype)
        frames = out.view(1, 4, -1)
        out[:, :, :] = self.conv(F.pad(x, (0, 0, 0, 0, 2, 0)))
        return frames.sum(-1)


CASES["stale_view"] = (StaleView, (1, 2, 7, 3, 2), "b c t h w", "t")


@pytest.mark.parametrize("world", [2, 3])
def test_a_buffer_with_views_is_written_whole_and_exact(world):
    assert run_ranks(_worker, world, "stale_view", timeout=120) == [True] * world
