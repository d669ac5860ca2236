"""The C2D + NL model sharded over time equals the whole model in float64, with and without
activation checkpointing of the non-local blocks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nonlocal_dist.testing import run_ranks
from helpers import rel_err
from nonlocal_dist import NonLocalBlock
from nonlocal_dist.models import C2DNonLocal


def _model(sp_group=None, checkpoint=None):
    torch.manual_seed(0)
    model = C2DNonLocal(in_channels=1, num_classes=3, widths=(4, 8), nonlocal_after=(0, 1),
                        sp_group=sp_group, checkpoint=checkpoint).double()
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, NonLocalBlock):
                block.norm.weight.fill_(0.7)  # leave the identity init so the blocks matter
    return model


def _worker(rank, world, checkpoint):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 6, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (2,), generator=gen)
    whole, sharded = _model(), _model(dist.group.WORLD, checkpoint)
    F.cross_entropy(whole(x), y).backward()
    (F.cross_entropy(sharded(x), y) / world).backward()
    scale = max(p.grad.abs().max().item() for p in whole.parameters())
    errors = {}
    for (name, p), q in zip(sharded.named_parameters(), whole.parameters()):
        total = p.grad.clone()
        dist.all_reduce(total)
        errors[name] = rel_err(total, q.grad, floor=scale)
    return errors


@pytest.mark.parametrize("checkpoint", [None, "torch"])
def test_sharded_model_gradients_equal_whole_model(checkpoint):
    for errors in run_ranks(_worker, 2, checkpoint):
        assert max(errors.values()) <= 1e-10, errors


def test_bad_checkpoint_option():
    with pytest.raises(ValueError, match="checkpoint must be"):
        C2DNonLocal(checkpoint="yes")
