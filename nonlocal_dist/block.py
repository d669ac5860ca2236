"""``NonLocalBlock``: the block of the paper over any named axes of a tensor."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from nonlocal_dist.backends import BACKEND_NAMES
from nonlocal_dist.conventions import MODES, SOFTMAX_MODES
from nonlocal_dist.distributed.checks import agree_on_shards, pooling_across_ranks
from nonlocal_dist.distributed.mesh import span_coordinates, span_group
from nonlocal_dist.functional import nonlocal_op
from nonlocal_dist.layout import (
    flatten_positions,
    max_pool_positions,
    normalise_sub_sample,
    parse_layout,
)
from nonlocal_dist.sequence import check_strategy_alone, parallel_nonlocal
from nonlocal_dist.sharded import batch_norm_rows
from nonlocal_dist.sharded.tensor import ShardedTensor, ShardingRefusal, user_frame
from nonlocal_dist.validate import one_of, positive_int


class NonLocalBlock(nn.Module):
    """``z = BN(W_z y) + x`` with ``y_i = 1/C(x) Σ_j f(theta_i, phi_j) g_j`` over the chosen axes.

    Input and output: a tensor named by ``layout`` (e.g. ``"b c t h w"`` (B, C, T, H, W) or
    ``"b n c"`` (B, N, C)). Positions along ``axes`` (default: all but ``b`` and ``c``) interact;
    the other axes fold into the batch, so ``axes="t"`` is a temporal non-local per pixel.

    theta, phi, g are 1×1 projections ``in_channels -> inter_channels`` (default ``in_channels //
    2``); in ``gaussian`` mode theta and phi are the input itself. ``sub_sample`` max-pools phi and g
    per axis (``{"h": 2, "w": 2}``; ``True``: 2 on every axis but ``t``). ``W_z`` maps back to
    ``in_channels`` and is followed by BatchNorm with zero weight (``norm=None``: W_z starts at zero),
    so a new block is the identity. ``heads`` splits the inter channels into independent heads.
    ``use_scale`` divides the softmax logits by sqrt(channels per head) (mmcv's ``use_scale``).

    Sequence parallel: with ``sp_group`` (a process group) the input is this rank's slice along
    ``shard_axis`` (one of ``axes``; default the first) and the output is the same slice of the
    single-device output; BatchNorm statistics span the group; ``sp_strategy`` picks the strategy
    (see ``nonlocal_op``). Parameter gradients are this rank's part: their sum over the group is
    the single-device gradient.
    """

    _lengths: tuple[list[int], list[int]] | None = None  # every rank's N and M while on a ShardedTensor
    _alone: bool = False  # while on a ShardedTensor whose groups are all of one (on_shards)

    def __init__(
        self,
        in_channels: int,
        *,
        layout: str = "b c t h w",
        axes: str | Sequence[str] | None = None,
        mode: str = "embedded_gaussian",
        inter_channels: int | None = None,
        sub_sample: bool | dict[str, int] | None = None,
        use_scale: bool = False,
        norm: str | None = "batch",
        heads: int = 1,
        backend: str = "auto",
        sp_group=None,
        shard_axis: str | None = None,
        sp_strategy: str | None = None,
    ) -> None:
        super().__init__()
        in_channels = positive_int("in_channels", in_channels)
        mode, backend = one_of("mode", mode, MODES), one_of("backend", backend, BACKEND_NAMES)
        if norm is not None and norm != "batch":
            raise ValueError(f"norm must be 'batch' or None, got {norm!r}")
        default_inter = max(in_channels // 2, 1)
        inter_channels = default_inter if inter_channels is None else positive_int("inter_channels", inter_channels)
        key_channels = in_channels if mode == "gaussian" else inter_channels
        heads = positive_int("heads", heads)
        if inter_channels % heads or key_channels % heads:
            raise ValueError(
                f"heads={heads} must divide inter_channels={inter_channels}"
                + (f" and in_channels={in_channels} (gaussian mode splits x itself)" if mode == "gaussian" else "")
            )
        self.layout = parse_layout(layout, axes)
        self.sub_sample = normalise_sub_sample(sub_sample, self.layout.axes)
        if sp_group is None and (shard_axis is not None or sp_strategy is not None):
            raise ValueError("shard_axis= and sp_strategy= need sp_group= (a torch.distributed process group)")
        shard_axis = self.layout.axes[0] if shard_axis is None else shard_axis
        if sp_group is not None and shard_axis not in self.layout.axes:
            raise ValueError(
                f"shard_axis {shard_axis!r} must be one of the interacting axes {self.layout.axes} "
                "(an axis folded into the batch needs no communication: shard it as data instead)"
            )
        self.sp_group, self.shard_axis, self.sp_strategy = sp_group, shard_axis, sp_strategy
        self.in_channels, self.inter_channels, self.heads = in_channels, inter_channels, heads
        self.mode, self.backend, self.use_scale = mode, backend, use_scale
        # use_scale (mmcv's) tempers the softmax; dot product and concatenation normalise by M instead.
        self.scale = 1.0 / math.sqrt(key_channels // heads) if use_scale and mode in SOFTMAX_MODES else 1.0

        self.g = nn.Linear(in_channels, inter_channels)
        self.theta = None if mode == "gaussian" else nn.Linear(in_channels, inter_channels)
        self.phi = None if mode == "gaussian" else nn.Linear(in_channels, inter_channels)
        if mode == "concatenation":
            d = inter_channels // heads
            shape = (2 * d,) if heads == 1 else (heads, 2 * d)
            self.concat_weight = nn.Parameter(torch.randn(shape) * math.sqrt(2.0 / (2 * d)))
        else:
            self.register_parameter("concat_weight", None)
        self.W_z = nn.Linear(inter_channels, in_channels, bias=norm is None)
        self.norm = nn.BatchNorm1d(in_channels) if norm == "batch" else None
        if self.norm is not None:
            nn.init.zeros_(self.norm.weight)
        else:
            nn.init.zeros_(self.W_z.weight)
            nn.init.zeros_(self.W_z.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, layout={self.layout.text!r}, axes={' '.join(self.layout.axes)!r}, "
            f"mode={self.mode!r}, inter_channels={self.inter_channels}, heads={self.heads}, "
            f"sub_sample={self.sub_sample or None}, scale={self.scale:.4g}, backend={self.backend!r}"
        )

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """theta (B', H, N, d), phi (B', H, M, d), g (B', H, M, dv) from x (B', *axes sizes, C)."""
        if self.theta is None:
            theta, phi, g = x, x, self.g(x)
        else:
            # One matmul for the three 1x1 projections: a single pass over x (memory-bound at scale).
            layers = (self.theta, self.phi, self.g)
            weight = torch.cat([layer.weight for layer in layers])
            bias = torch.cat([layer.bias for layer in layers])
            theta, phi, g = F.linear(x, weight, bias).split(self.inter_channels, dim=-1)
        axes = self.layout.axes
        phi = max_pool_positions(phi, axes, self.sub_sample)
        g = max_pool_positions(g, axes, self.sub_sample)
        split = "b n (h d) -> b h n d"
        return tuple(rearrange(flatten_positions(t), split, h=self.heads) for t in (theta, phi, g))

    def agreed_settings(self) -> tuple:
        """What every rank's copy of this block must share beside its parameters (``parallelize``
        compares it in its one agreement per call)."""
        return self.mode, self.scale, self.backend, self.sp_strategy, self.heads, tuple(sorted(self.sub_sample.items()))

    def attend(self, theta: Tensor, phi: Tensor, g: Tensor) -> Tensor:
        """y (B', H, N, dv) = the non-local operation of this block's mode. On a sharded activation every
        rank's N and M come from its spec (``_spec_lengths``): no agreement collective then."""
        if self._lengths is not None:
            return parallel_nonlocal(
                theta, phi, g, self.mode, scale=self.scale, concat_weight=self.concat_weight, backend=self.backend,
                group=self.sp_group, strategy=self.sp_strategy, lengths=self._lengths,
            )
        if self._alone and self.sp_strategy is not None:  # a group of one (see on_shards): no strategy
            check_strategy_alone(theta, phi, g, self.mode, scale=self.scale, concat_weight=self.concat_weight,
                                 backend=self.backend, strategy=self.sp_strategy)  # runs, but refused as on more ranks
        return nonlocal_op(
            theta, phi, g, self.mode, scale=self.scale, concat_weight=self.concat_weight, backend=self.backend,
            group=self.sp_group, strategy=self.sp_strategy if self.sp_group is not None else None,
        )

    def output(self, y: Tensor) -> Tensor:
        """``BN(W_z y)`` (B', N, C) from y (B', H, N, dv)."""
        z = self.W_z(rearrange(y, "b h n d -> b n (h d)"))
        if self.norm is not None:
            if self.norm.training and self.norm.track_running_stats and torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    "torch.func transforms (vmap, jacrev, grad) cannot update BatchNorm's running statistics "
                    "in training mode: call block.eval(), or torch.func.replace_all_batch_norm_modules_(block) "
                    "to normalise by batch statistics alone"
                )
            rows = z.reshape(-1, self.in_channels)
            normed = batch_norm_rows(rows, self.norm, self.sp_group)
            if normed.requires_grad:
                # The gradient comes back in the input layout's order (a strided view for "b c t h w");
                # BatchNorm's CPU backward is 5-10x slower on a strided gradient than on a contiguous one.
                normed.register_hook(_contiguous_grad)
            z = normed.view_as(z)
        return z

    def _check_shards(self, x: Tensor) -> None:
        """This rank's slice checked and agreed on by every rank of ``sp_group`` (raises on every rank)."""
        agree_on_shards(
            self.sp_group, x, self.layout, self.in_channels, self.shard_axis, self.sub_sample,
            what="NonLocalBlock", extra=lambda: (None, {"training": self.training}), extra_names=("training",),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x in ``layout`` -> z of the same shape (a ``ShardedTensor`` in, the same shards out)."""
        if isinstance(x, ShardedTensor):
            return self._forward_sharded(x)
        return self._forward_plain(x)

    def _forward_plain(self, x: Tensor) -> Tensor:
        if self.sp_group is None or self._lengths is not None:
            self.layout.check(x, self.in_channels)
        else:  # the layout too is checked inside the exchange: a bad slice on one rank raises on all
            self._check_shards(x)
        sizes = self.layout.sizes(x)
        xp = self.layout.to_positions(x)
        y = self.attend(*self.embed(xp))
        z = self.output(y).view(xp.shape)
        return x + self.layout.from_positions(z, sizes)


    def _forward_sharded(self, x: ShardedTensor) -> ShardedTensor:
        """The block on a sharded activation: its one sharded axis is the block's shard axis and group."""
        with self.on_shards(x) as local:
            # Not self.forward: checkpointing from outside replaces it on the instance, and a nested
            # checkpoint would recompute after the group is put back.
            z = self._forward_plain(local)
        return ShardedTensor.wrap(z, x.spec)

    def _spec_lengths(self, x: ShardedTensor, local: Tensor) -> tuple[list[int], list[int]]:
        """Every rank's query and key counts N and M (in ``sp_group``'s rank order), from x's spec: the
        spec is the same on every rank, so no collective is needed and a refusal raises on every rank.
        Refuses a ``sub_sample`` window that would cross ranks (a shard length not a multiple of it)."""
        dims, names = x.spec.dims, self.layout.names
        shape = x.spec.global_shape(local.shape)
        sharded = {names[d]: (i, shard) for i, (d, shard) in enumerate(dims)}
        factors = [self.sub_sample.get(a, 1) for a in sharded]
        if any(s % f for (_, shard), f in zip(sharded.values(), factors) for s in shard.sizes):
            lengths = [list(shard.sizes) for _, shard in sharded.values()]
            lengths = lengths[0] if len(lengths) == 1 else list(zip(*lengths))
            raise ShardingRefusal(f"{pooling_across_ranks(list(sharded), factors, lengths)} (parallelize's "
                                  f"align=) (at {user_frame()})")
        counts_n, counts_m = [], []
        for coordinate in span_coordinates([shard.group for _, shard in dims]):
            n = m = 1
            for axis in self.layout.axes:
                i, shard = sharded.get(axis, (None, None))
                length = shape[names.index(axis)] if shard is None else shard.sizes[coordinate[i]]
                n, m = n * length, m * (length // self.sub_sample.get(axis, 1))
            counts_n.append(n)
            counts_m.append(m)
        return counts_n, counts_m

    @contextlib.contextmanager
    def on_shards(self, x: Tensor):
        """Yield x's local shard with ``sp_group``/``shard_axis`` taken from its spec for the duration
        (a plain x is yielded as it is). An activation sharded over several mesh dims (t and h of a
        2-D mesh) runs over one group spanning the mesh (``mesh.span_group``): the sum over j is the
        same in any order of the ranks. Refuses, on every rank, a sharded dim that is not one of the
        block's interacting axes."""
        if not isinstance(x, ShardedTensor):
            yield x
            return
        dims, names = x.spec.dims, self.layout.names
        if not dims or any(names[d] not in self.layout.axes for d, _ in dims):
            raise ShardingRefusal(
                f"NonLocalBlock (layout {self.layout.text!r}, axes {self.layout.axes}) got an activation sharded on dims "
                f"{[d for d, _ in dims]} ({[names[d] for d, _ in dims]}): it takes activations sharded along its "
                f"interacting axes only (at {user_frame()})"
            )
        # Plain attributes (never parameters, buffers or modules), set in the instance's dict: nn.Module's
        # __setattr__ checks each against its registries, at every call of the block.
        state = self.__dict__
        saved = {key: getattr(self, key) for key in ("sp_group", "shard_axis", "_lengths", "_alone")}
        axes = tuple(names[d] for d, _ in dims)
        alone = all(shard.world == 1 for _, shard in dims)  # this rank holds every position: the block as on one device
        state["sp_group"] = None if alone else span_group([shard.group for _, shard in dims])
        state["shard_axis"] = axes[0] if len(axes) == 1 else axes
        state["_alone"] = alone
        try:
            with torch._C.DisableTorchFunctionSubclass():
                local = x.to_local()
                state["_lengths"] = None if alone else self._spec_lengths(x, local)
                yield local
        finally:
            state.update(saved)


def _contiguous_grad(grad: Tensor | None) -> Tensor | None:
    # None reaches the hook when a downstream function returns no gradient (gradcheck checks this).
    return None if grad is None else grad.contiguous()
