"""NonLocalBlock in half precision: under torch.autocast and cast to bf16/fp16, every mode, forward and
backward against the float64 oracle on the rounded inputs; BatchNorm statistics in float32; batches
with no rows or one row; the sequence-parallel block under autocast equals the single process."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import assert_rel, rel_err
from oracle import oracle_block

from nonlocal_dist import MODES, NonLocalBlock
from nonlocal_dist.testing import run_ranks

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _block(mode: str, **kwargs) -> NonLocalBlock:
    torch.manual_seed(0)
    block = NonLocalBlock(8, mode=mode, sub_sample=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return block


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["autocast", "cast"])
@pytest.mark.parametrize("half", ["bf16", "fp16"])
@pytest.mark.parametrize("train", [True, False])
def test_half_precision_block_matches_oracle_on_rounded_inputs(mode, how, half, train):
    dtype = HALF[half]
    block = _block(mode).train(train)
    x = _x(2, 8, 3, 6, 6)
    if how == "cast":  # parameters, buffers and input rounded to the half dtype: the oracle sees those
        block, x = block.to(dtype), x.to(dtype)
    block64 = copy.deepcopy(block).double()
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
        z = block(x)
    z.float().square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    z64 = oracle_block(copy.deepcopy(block64), x64)
    z64.square().sum().backward()
    assert z.dtype == (torch.float32 if how == "autocast" else dtype)
    assert_rel(z, z64, 2e-2, "z")
    assert_rel(x.grad, x64.grad, 3e-2, "dx")
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if train:  # running statistics moved as a float64 block's (float32 buffers under autocast)
        block64(x.detach().double())
        assert block.norm.running_var.dtype == (torch.float32 if how == "autocast" else dtype)
        assert_rel(block.norm.running_mean, block64.norm.running_mean, 3e-2, "running mean")
        assert_rel(block.norm.running_var, block64.norm.running_var, 3e-2, "running var")


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_under_autocast_leaves_running_statistics(mode):
    block = _block(mode).train()
    before = {k: v.clone() for k, v in block.norm.state_dict().items()}
    x = torch.randn(0, 8, 3, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = block(x)
    z.sum().backward()
    assert z.shape == x.shape
    assert torch.equal(block.norm.running_mean, before["running_mean"])
    assert torch.equal(block.norm.running_var, before["running_var"])
    # Counted, as nn.BatchNorm1d counts an empty batch in every precision.
    assert block.norm.num_batches_tracked == before["num_batches_tracked"] + 1


@pytest.mark.parametrize("autocast", [False, True])
def test_one_row_in_training_raises_in_every_precision(autocast):
    block = NonLocalBlock(8, layout="b n c").train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            block(torch.randn(1, 1, 8))
        block.eval()(torch.randn(1, 1, 8))  # eval normalises by the running statistics: one row is fine


def _sp_autocast(rank, world):
    return {mode: _sp_autocast_mode(mode) for mode in MODES}


def _sp_autocast_mode(mode):
    group = dist.group.WORLD
    whole = _block(mode)
    sharded = _block(mode, sp_group=group, shard_axis="t")
    x, grad = _x(2, 8, 6, 6, 6), torch.randn(2, 8, 6, 6, 6, generator=torch.Generator().manual_seed(3))
    from nonlocal_dist.sequence import gather_tensor, shard_tensor

    xw, xs = x.clone().requires_grad_(), shard_tensor(x, "b c t h w", "t", group).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zw, zs = whole(xw), sharded(xs)
    zw.backward(grad)
    zs.backward(shard_tensor(grad, "b c t h w", "t", group))
    errors = {
        "z": rel_err(gather_tensor(zs.detach(), "b c t h w", "t", group), zw),
        "dx": rel_err(xs.grad, shard_tensor(xw.grad, "b c t h w", "t", group)),
        "running_var": rel_err(sharded.norm.running_var, whole.norm.running_var),
    }
    for (name, p), pw in zip(sharded.named_parameters(), whole.parameters()):
        total = p.grad.clone()
        dist.all_reduce(total, group=group)
        errors[f"d{name}"] = rel_err(total, pw.grad, floor=max(q.grad.abs().max().item() for q in whole.parameters()))
    return errors


def test_sequence_parallel_block_under_autocast_equals_single_process():
    for per_mode in run_ranks(_sp_autocast, 2, timeout=300):
        for mode, errors in per_mode.items():
            assert all(err < 3e-2 for err in errors.values()), (mode, errors)


@pytest.mark.parametrize("mode", MODES)
def test_float64_block_under_autocast_stays_float64(mode):
    # autocast leaves float64 alone (a Linear on float64 stays float64): so does the operation.
    block = _block(mode).double().eval()
    x = _x(2, 8, 3, 6, 6).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = block(x)
    assert z.dtype == torch.float64
    assert_rel(z, oracle_block(block, x), 1e-12, "z")
