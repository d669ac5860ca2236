"""A small C2D video classifier with non-local blocks between its stages (the paper's recipe).

Every convolution is 1×k×k (no temporal extent, as in the paper's C2D baseline), so frames only
meet through the non-local blocks and the final pooling. The model is written for one device;
``nonlocal_dist.parallelize(model, group, "t")`` shards its activations over time from outside (the
1×k×k convolutions need no halo; BatchNorm statistics, the non-local blocks and the global pooling
span the group), and the logits equal the single-device logits.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from nonlocal_dist.block import NonLocalBlock
from nonlocal_dist.sharded import group_batch_norm
from nonlocal_dist.sharded.distribute import parallelize


class _Norm3d(nn.BatchNorm1d):
    """BatchNorm over (B, C, T, H, W) that also takes DeepSpeed's bf16 (bf16 weights, float32 buffers)."""

    def forward(self, x: Tensor) -> Tensor:
        return group_batch_norm(x, self)


class _Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            _Norm3d(cout),
            nn.ReLU(inplace=True),
        )


class C2DNonLocal(nn.Module):
    """(B, C_in, T, H, W) clips -> (B, num_classes) logits.

    ``widths`` are the channels of the stages (each halves H and W but the first); a non-local block
    (spacetime, ``mode``, phi/g max-pooled 2×2 in space) follows every stage listed in
    ``nonlocal_after`` (the paper puts them at res3/res4); ``nonlocal_after=()`` is the ablation.
    ``checkpoint`` ('torch' or 'deepspeed') recomputes the non-local blocks in the backward instead
    of keeping their activations (exact: same gradients and BatchNorm statistics).
    ``sp_group``/``sp_strategy``: a shorthand for ``parallelize(model, sp_group, "t", strategy=...)``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        num_classes: int = 2,
        widths: tuple[int, ...] = (16, 32, 64),
        nonlocal_after: tuple[int, ...] = (1, 2),
        mode: str = "embedded_gaussian",
        sp_group=None,
        sp_strategy: str | None = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if checkpoint not in (None, "torch", "deepspeed"):
            raise ValueError(f"checkpoint must be None, 'torch' or 'deepspeed', got {checkpoint!r}")
        self.checkpoint = checkpoint
        layers: list[nn.Module] = []
        cin = in_channels
        for index, width in enumerate(widths):
            layers.append(_Stage(cin, width, 1 if index == 0 else 2))
            if index in nonlocal_after:
                layers.append(NonLocalBlock(width, mode=mode, sub_sample={"h": 2, "w": 2}, use_scale=True))
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(cin, num_classes)
        if sp_group is not None:
            parallelize(self, sp_group, "t", strategy=sp_strategy)
        elif sp_strategy is not None:
            raise ValueError("sp_strategy= needs sp_group= (a torch.distributed process group)")

    def _run_features(self, x: Tensor) -> Tensor:
        for layer in self.features:
            if self.checkpoint is not None and self.training and isinstance(layer, NonLocalBlock):
                x = self._checkpointed(layer, x)
            else:
                x = layer(x)
        return x

    def _checkpointed(self, layer: NonLocalBlock, x: Tensor) -> Tensor:
        """``layer(x)`` without its activations kept; the backward's recomputation leaves buffers alone.

        BatchNorm updates its running statistics on every training forward, so the recomputation
        runs on copies of the buffers: the statistics (and so evaluation) equal those of a run
        without checkpointing. (Copies rather than restoring values: autograd saved the originals.)
        """
        calls = []

        def run(inputs: Tensor) -> Tensor:
            if not calls:
                calls.append(1)
                return layer(inputs)
            owners = [(m, name, buf) for m in layer.modules() for name, buf in m._buffers.items() if buf is not None]
            for module, name, buf in owners:
                module._buffers[name] = buf.clone()
            try:
                return layer(inputs)
            finally:
                for module, name, buf in owners:
                    module._buffers[name] = buf

        if self.checkpoint == "torch":
            return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
        import deepspeed

        return deepspeed.checkpointing.checkpoint(run, x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self._run_features(x)).flatten(1))
