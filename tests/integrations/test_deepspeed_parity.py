"""One DeepSpeed step with SP = 2 equals one single-process step on the whole clip, ZeRO 0-3."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_harness import run_ranks
from helpers import rel_err

deepspeed = pytest.importorskip("deepspeed")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHAPE = (2, 2, 6, 8, 8)  # B C T H W: 6 frames, 3 per rank


def _config(stage: int) -> dict:
    cfg = json.loads((CONFIGS / f"ds_zero{max(stage, 1)}.json").read_text())
    cfg["zero_optimization"]["stage"] = stage
    cfg["train_micro_batch_size_per_gpu"] = SHAPE[0]
    # SGD keeps "same updated weights" well-conditioned: Adam turns rounding noise in gradients that
    # are analytically zero into full-size steps.
    cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def _model(sp_group=None, checkpoint=None):
    from nonlocal_dist.models import C2DNonLocal

    torch.manual_seed(0)
    return C2DNonLocal(in_channels=2, num_classes=3, widths=(4, 8), nonlocal_after=(0, 1), sp_group=sp_group,
                       checkpoint=checkpoint)


def _open_nonlocal_blocks(model):
    """Leave the identity initialisation (BN weight 0) so that the non-local parameters get gradients."""
    from nonlocal_dist import NonLocalBlock

    weights = [m.norm.weight for m in model.modules() if isinstance(m, NonLocalBlock)]
    with deepspeed.zero.GatheredParameters(weights, modifier_rank=0):
        with torch.no_grad():
            for w in weights:
                w.fill_(0.7)
    return model


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(*SHAPE, generator=gen), torch.randint(0, 3, (SHAPE[0],), generator=gen)


def _reference(stage: int, steps: int):
    model = _open_nonlocal_blocks(_model()).double()
    x, y = _data()
    x = x.double()
    opt = torch.optim.SGD(model.parameters(), **_config(stage)["optimizer"]["params"])
    grads = None
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}, dict(model.named_buffers())


def _sp_worker(rank, world, stage, steps, checkpoint):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from nonlocal_dist.integrations.deepspeed_sp import init_sequence_parallel, initialize, loss_scale, model_context
    from nonlocal_dist.parallel import shard_tensor

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")
    sp = init_sequence_parallel(2)
    cfg = _config(stage)
    with model_context(cfg, sp):
        model = _model(sp.sp_group, checkpoint)
    _open_nonlocal_blocks(model)
    engine = initialize(model, cfg, sp)
    x, y = _data()
    x_local = shard_tensor(x, "b c t h w", "t", sp.sp_group)
    grads, weights_after_each = None, []
    for step in range(steps):
        loss = F.cross_entropy(engine(x_local), y) * loss_scale(cfg, sp)
        engine.backward(loss)
        if step == 0:
            grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.step()
        # Without ZeRO there is no fp32 master copy: the module's parameters are the weights.
        weights_after_each.append({n: (safe_get_full_fp32_param(p) if stage else p).detach().clone()
                                   for n, p in engine.module.named_parameters()})
    buffers = {n: b.clone() for n, b in engine.module.named_buffers()}
    return grads, weights_after_each[-1], buffers


# Activation checkpointing of the non-local blocks (recomputed in the backward, with collectives
# under SP) must leave every gradient, weight and BatchNorm statistic unchanged.
@pytest.mark.parametrize("stage, checkpoint", [(0, None), (1, None), (2, None), (3, None), (2, "deepspeed"), (3, "torch")])
def test_sp2_step_matches_single_process(stage, checkpoint):
    steps = 3
    ref_grads, ref_weights, ref_buffers = _reference(stage, steps)
    assert all(g.abs().max() > 0 for g in ref_grads.values()), "every parameter must receive a gradient"
    results = run_ranks(_sp_worker, 2, stage, steps, checkpoint, timeout=240)
    # DeepSpeed runs float32, the reference float64: gradients compared on the scale of the largest
    # one (a BatchNorm weight's gradient is a cancelling sum), weights relative to themselves.
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    for rank, (grads, weights, buffers) in enumerate(results):
        for name, ref in ref_grads.items():
            err = rel_err(grads[name], ref, floor=grad_scale)
            assert err <= 1e-5, f"rank {rank} grad {name}: {err:.2e}"
        for name, ref in ref_weights.items():
            assert rel_err(weights[name], ref) <= 1e-5, f"rank {rank} weight {name} after {steps} steps"
        for name, ref in ref_buffers.items():
            assert rel_err(buffers[name].to(ref.dtype), ref) <= 1e-5, f"rank {rank} buffer {name} after {steps} steps"
    # The SP ranks hold identical weights after several steps.
    for name in ref_weights:
        assert torch.equal(results[0][1][name], results[1][1][name]), name
