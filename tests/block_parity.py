"""One check for the sequence-parallel NonLocalBlock: run on gloo ranks, it compares the sharded block
with the block on the whole tensor in float64 (z, z gathered, dx, every parameter gradient summed
over ranks, running_var), in training and eval mode; shards may be empty."""
from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import rel_err

from nonlocal_dist import NonLocalBlock
from nonlocal_dist.sequence import gather_tensor, shard_tensor


def sharded_block_failures(rank: int, world: int, mode: str, configs: list, seed: int) -> list[str]:
    """Each config: (shard_axis, sub_sample, (B, C=8, T, H, W)); returns a line per mismatch (none: [])."""
    failures = []
    group = dist.group.WORLD
    for index, (shard_axis, sub_sample, shape) in enumerate(configs):
        torch.manual_seed(seed + index)
        whole = NonLocalBlock(8, mode=mode, sub_sample=sub_sample, heads=2).double()
        with torch.no_grad():
            for p in whole.parameters():
                p.copy_(torch.randn_like(p) * 0.4)
        sharded = NonLocalBlock(8, mode=mode, sub_sample=sub_sample, heads=2, sp_group=group, shard_axis=shard_axis).double()
        sharded.load_state_dict(whole.state_dict())
        x, grad = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)

        def shard(t):
            return shard_tensor(t, "b c t h w", shard_axis, group)

        for train in (True, False):
            whole.train(train), sharded.train(train)
            whole.zero_grad(), sharded.zero_grad()
            xw = x.clone().requires_grad_()
            zw = whole(xw)
            zw.backward(grad)
            xs = shard(x).requires_grad_()
            zs = sharded(xs)
            zs.backward(shard(grad))
            checks = {
                "z": (zs, shard(zw)),
                "z gathered": (gather_tensor(zs.detach(), "b c t h w", shard_axis, group), zw),
                "dx": (xs.grad, shard(xw.grad)),
            }
            # Gradients that are analytically zero (g's bias under training BatchNorm) are compared on
            # the scale of the largest parameter gradient, as in tests/test_block.py.
            grad_scale = max(p.grad.abs().max().item() for p in whole.parameters())
            floors = {}
            for (name, p), pw in zip(sharded.named_parameters(), whole.parameters()):
                total = torch.zeros_like(pw) if p.grad is None else p.grad.clone()  # None: a rank without positions
                dist.all_reduce(total, group=group)
                checks[f"d{name} (sum over ranks)"] = (total, pw.grad)
                floors[f"d{name} (sum over ranks)"] = grad_scale
            checks["running_var"] = (sharded.norm.running_var, whole.norm.running_var)
            for name, (got, want) in checks.items():
                err = 0.0 if want.numel() == 0 else rel_err(got, want, floors.get(name, 0.0))
                if got.shape != want.shape or not err <= 1e-10 or got.isnan().any():
                    failures.append(f"config {index} train={train}: {name} {tuple(got.shape)} rel err {err:.2e}")
    return failures
