"""A small C2D video classifier with non-local blocks between its stages (the paper's recipe).

Every convolution is 1×k×k (no temporal extent, as in the paper's C2D baseline), so frames only
meet through the non-local blocks and the final pooling. That makes the time axis shardable with
no halo exchange: with ``sp_group`` the input is this rank's slice of frames, BatchNorm statistics
and the global pooling span the group, and the logits equal the single-device logits.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from nonlocal_dist.block import NonLocalBlock
from nonlocal_dist.parallel import batch_norm_rows
from nonlocal_dist.parallel.collectives import all_reduce


class _Norm3d(nn.BatchNorm1d):
    """BatchNorm over (B, C, T, H, W) whose statistics span ``sp_group`` when one is given."""

    def __init__(self, channels: int, sp_group=None) -> None:
        super().__init__(channels)
        self.sp_group = sp_group

    def forward(self, x: Tensor) -> Tensor:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        out = batch_norm_rows(rows, self, self.sp_group)
        return out.view(*x.shape[:1], *x.shape[2:], x.shape[1]).movedim(-1, 1)


class _Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int, sp_group) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            _Norm3d(cout, sp_group),
            nn.ReLU(inplace=True),
        )


class C2DNonLocal(nn.Module):
    """(B, C_in, T, H, W) clips -> (B, num_classes) logits.

    ``widths`` are the channels of the stages (each halves H and W but the first); a non-local block
    (spacetime, ``mode``, phi/g max-pooled 2×2 in space) follows every stage listed in
    ``nonlocal_after`` (the paper puts them at res3/res4); ``nonlocal_after=()`` is the ablation.
    ``checkpoint`` ('torch' or 'deepspeed') recomputes the non-local blocks in the backward instead
    of keeping their activations (exact: same gradients and BatchNorm statistics).
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
        self.sp_group, self.checkpoint = sp_group, checkpoint
        layers: list[nn.Module] = []
        cin = in_channels
        for index, width in enumerate(widths):
            layers.append(_Stage(cin, width, 1 if index == 0 else 2, sp_group))
            if index in nonlocal_after:
                sp = {"sp_group": sp_group, "shard_axis": "t", "sp_strategy": sp_strategy} if sp_group is not None else {}
                layers.append(NonLocalBlock(width, mode=mode, sub_sample={"h": 2, "w": 2}, use_scale=True, **sp))
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

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
        feats = self._run_features(x)
        # Global average pool over (T, H, W); under SP the sums of every rank's frames are added.
        total = feats.sum(dim=(2, 3, 4))
        count = torch.tensor(float(feats[0, 0].numel()), dtype=feats.dtype, device=feats.device)
        if self.sp_group is not None:
            total = all_reduce(total, self.sp_group)
            count = all_reduce(count, self.sp_group)
        return self.head(total / count)
