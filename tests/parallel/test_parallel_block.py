"""NonLocalBlock(sp_group=, shard_axis=) on real gloo ranks equals the block on the whole tensor."""
from __future__ import annotations



import pytest
import torch
import torch.distributed as dist

from dist_harness import run_ranks
from helpers import rel_err
from nonlocal_dist import NonLocalBlock
from nonlocal_dist.parallel import gather_tensor, shard_tensor

CONFIGS = [
    ("t", None, (2, 8, 7, 5, 4)),
    ("t", {"h": 2, "w": 2}, (2, 8, 7, 5, 4)),
    ("t", {"t": 2, "h": 2}, (1, 8, 12, 5, 4)),
    ("h", {"h": 2, "w": 2}, (2, 8, 3, 12, 5)),
]


def _block_case(rank, world, mode):
    failures = []
    group = dist.group.WORLD
    for index, (shard_axis, sub_sample, shape) in enumerate(CONFIGS):
        torch.manual_seed(10 + index)
        whole = NonLocalBlock(8, mode=mode, sub_sample=sub_sample, heads=2).double()
        with torch.no_grad():
            for p in whole.parameters():
                p.copy_(torch.randn_like(p) * 0.4)
        sharded = NonLocalBlock(8, mode=mode, sub_sample=sub_sample, heads=2, sp_group=group, shard_axis=shard_axis).double()
        sharded.load_state_dict(whole.state_dict())
        x = torch.randn(*shape, dtype=torch.float64)
        grad = torch.randn(*shape, dtype=torch.float64)
        for train in (True, False):
            whole.train(train), sharded.train(train)
            whole.zero_grad(), sharded.zero_grad()
            xw = x.clone().requires_grad_()
            zw = whole(xw)
            zw.backward(grad)
            xs = shard_tensor(x, "b c t h w", shard_axis, group).requires_grad_()
            zs = sharded(xs)
            zs.backward(shard_tensor(grad, "b c t h w", shard_axis, group))
            checks = {
                "z": (zs, shard_tensor(zw, "b c t h w", shard_axis, group)),
                "z gathered": (gather_tensor(zs.detach(), "b c t h w", shard_axis, group), zw),
                "dx": (xs.grad, shard_tensor(xw.grad, "b c t h w", shard_axis, group)),
            }
            # Gradients that are analytically zero (g's bias under training BatchNorm) are compared on
            # the scale of the largest parameter gradient, as in tests/test_block.py.
            grad_scale = max(p.grad.abs().max().item() for p in whole.parameters())
            floors = {}
            for (name, p), pw in zip(sharded.named_parameters(), whole.parameters()):
                total = p.grad.clone()
                dist.all_reduce(total, group=group)
                checks[f"d{name} (sum over ranks)"] = (total, pw.grad)
                floors[f"d{name} (sum over ranks)"] = grad_scale
            checks["running_var"] = (sharded.norm.running_var, whole.norm.running_var)
            for name, (got, want) in checks.items():
                err = rel_err(got, want, floors.get(name, 0.0))
                if not err <= 1e-10:
                    failures.append(f"config {index} train={train}: {name} rel err {err:.2e}")
    return failures


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_sharded_block_equals_whole_block(world, mode):
    failures = run_ranks(_block_case, world, mode)
    assert not any(failures), failures


def _pooling_across_boundary(rank, world):
    block = NonLocalBlock(4, sub_sample={"t": 2}, sp_group=dist.group.WORLD, shard_axis="t")
    x = shard_tensor(torch.randn(1, 4, 7, 3, 3), "b c t h w", "t", dist.group.WORLD)  # shards 4 and 3
    try:
        block(x)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_pooling_across_shard_boundary_raises_on_every_rank():
    for message in run_ranks(_pooling_across_boundary, 2, timeout=60):
        assert "not all divisible by 2" in message, message


def _shape_mismatch(rank, world):
    block = NonLocalBlock(4, sp_group=dist.group.WORLD, shard_axis="t")
    x = torch.randn(1, 4, 3, 3, 3 + rank)  # w differs between ranks
    try:
        block(x)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_block_shape_mismatch_raises_on_every_rank():
    for message in run_ranks(_shape_mismatch, 2, timeout=60):
        assert "w per rank = [3, 4]" in message, message


def test_block_sp_arguments_validated():
    with pytest.raises(ValueError, match="need sp_group"):
        NonLocalBlock(4, shard_axis="t")
    with pytest.raises(ValueError, match="must be one of the interacting axes"):
        NonLocalBlock(4, axes="h w", sp_group=object(), shard_axis="t")

