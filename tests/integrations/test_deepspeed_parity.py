"""DeepSpeed steps with SP = 2 equal single-process steps on the whole clip, ZeRO 0-3: the C2D model
(sequence parallel through its constructor) and the I3D model (sharded by ``parallelize``, its
temporal convolutions and pooling exchanging halos)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from nonlocal_dist.testing import run_ranks

deepspeed = pytest.importorskip("deepspeed")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHAPES = {"c2d": (2, 2, 6, 8, 8), "i3d": (2, 2, 8, 8, 8)}  # B C T H W: 3 / 4 frames per rank


def _config(stage: int) -> dict:
    cfg = json.loads((CONFIGS / f"ds_zero{max(stage, 1)}.json").read_text())
    cfg["zero_optimization"]["stage"] = stage
    cfg["train_micro_batch_size_per_gpu"] = 2
    # SGD keeps "same updated weights" well-conditioned: Adam turns rounding noise in gradients that
    # are analytically zero into full-size steps.
    cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def _model(name: str, sp_group=None, checkpoint=None):
    from nonlocal_dist.models import C2DNonLocal, I3DNonLocal

    torch.manual_seed(0)
    if name == "c2d":
        return C2DNonLocal(in_channels=2, num_classes=3, widths=(4, 8), nonlocal_after=(0, 1), sp_group=sp_group,
                           checkpoint=checkpoint)
    # Temporal kernels 3 in the stem, the pool (stride 2) and both inflated blocks: halos at every layer.
    return I3DNonLocal(2, 3, stem_channels=4, stem_stride=1, widths=(8, 8), depths=(1, 2), strides=(1, 2),
                       inflate=((1,), (1, 1)), inflate_style="3x3x3", nonlocal_stages=((1,), (0, 1)))


def _sharded_i3d(sp_group, checkpoint):
    """The single-device I3D, sharded over time from outside, its non-local blocks checkpointed from outside."""
    from nonlocal_dist import parallelize
    from nonlocal_dist.checkpointing import apply_activation_checkpointing

    model = parallelize(_model("i3d"), sp_group, axis="t")
    return model if checkpoint is None else apply_activation_checkpointing(model, checkpoint)


def _open_nonlocal_blocks(model):
    """Leave the identity initialisation (BN weight 0) so that the non-local parameters get gradients."""
    from nonlocal_dist import NonLocalBlock

    weights = [m.norm.weight for m in model.modules() if isinstance(m, NonLocalBlock)]
    with deepspeed.zero.GatheredParameters(weights, modifier_rank=0):
        with torch.no_grad():
            for w in weights:
                w.fill_(0.7)
    return model


def _data(name: str):
    gen = torch.Generator().manual_seed(1)
    shape = SHAPES[name]
    return torch.randn(*shape, generator=gen), torch.randint(0, 3, (shape[0],), generator=gen)


def _reference(name: str, stage: int, steps: int):
    model = _open_nonlocal_blocks(_model(name)).double()
    x, y = _data(name)
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


def _sp_worker(rank, world, name, stage, steps, checkpoint):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from nonlocal_dist.integrations.deepspeed_sp import (
        init_distributed,
        init_sequence_parallel,
        initialize,
        loss_scale,
        model_context,
    )

    from nonlocal_dist.sharded import distribute

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    init_distributed("gloo")
    sp = init_sequence_parallel(2)
    cfg = _config(stage)
    with model_context(cfg, sp):
        model = _model(name, sp.sp_group, checkpoint) if name == "c2d" else _sharded_i3d(sp.sp_group, checkpoint)
    _open_nonlocal_blocks(model)
    engine = initialize(model, cfg, sp)
    x, y = _data(name)
    x_local = distribute(x, sp.sp_group, "b c t h w", "t")
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


# float32 (DeepSpeed) against float64: (gradient, weight and statistics) tolerances. The I3D is deeper
# and its max pooling and BatchNorm over 2 clips amplify rounding: a single-process float32 run is
# itself 4e-6 off in the first gradients and 2e-4 off in the weights after 3 steps; a missing halo or
# a wrong reduction is off by 1e-2 or more. Weights are compared relative to themselves, with a floor
# for the biases whose gradient is analytically zero (a shift that a later 1x1x1 conv + BN removes).
TOL = {"c2d": (1e-5, 1e-5), "i3d": (3e-5, 1e-3)}


# Activation checkpointing of the non-local blocks (recomputed in the backward, with collectives
# under SP) must leave every gradient, weight and BatchNorm statistic unchanged.
@pytest.mark.parametrize("name, stage, checkpoint", [
    ("c2d", 0, None), ("c2d", 1, None), ("c2d", 2, None), ("c2d", 3, None),
    ("c2d", 2, "deepspeed"), ("c2d", 3, "torch"),
    ("i3d", 1, None), ("i3d", 2, "deepspeed"), ("i3d", 3, "torch"),
])
def test_sp2_step_matches_single_process(name, stage, checkpoint):
    steps = 3
    ref_grads, ref_weights, ref_buffers = _reference(name, stage, steps)
    assert all(g.abs().max() > 0 for g in ref_grads.values()), "every parameter must receive a gradient"
    results = run_ranks(_sp_worker, 2, name, stage, steps, checkpoint, timeout=240)
    # Gradients compared on the scale of the largest one (a BatchNorm weight's gradient is a cancelling sum).
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    grad_tol, tol = TOL[name]
    for rank, (grads, weights, buffers) in enumerate(results):
        for key, ref in ref_grads.items():
            err = rel_err(grads[key], ref, floor=grad_scale)
            assert err <= grad_tol, f"rank {rank} grad {key}: {err:.2e}"
        for key, ref in ref_weights.items():
            err = rel_err(weights[key], ref, floor=1e-2)
            assert err <= tol, f"rank {rank} weight {key} after {steps} steps: {err:.2e}"
        for key, ref in ref_buffers.items():
            err = rel_err(buffers[key].to(ref.dtype), ref)
            assert err <= tol, f"rank {rank} buffer {key} after {steps} steps: {err:.2e}"
    # The SP ranks hold identical weights after several steps.
    for key in ref_weights:
        assert torch.equal(results[0][1][key], results[1][1][key]), key


def _mesh_worker(rank, world, stage):
    """A (dp=2, t=2) DeviceMesh: each data-parallel group trains on its own clip, sharded over t."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from nonlocal_dist.integrations.deepspeed_sp import (
        init_distributed,
        initialize,
        loss_scale,
        model_context,
        sequence_parallel_from_mesh,
        shard_batch,
    )
    from torch.distributed.device_mesh import init_device_mesh

    from nonlocal_dist import parallelize

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    init_distributed("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "t"))
    sp = sequence_parallel_from_mesh(mesh)
    cfg = {**_config(stage), "train_micro_batch_size_per_gpu": 1}
    with model_context(cfg, sp):
        model = parallelize(_model("i3d"), mesh, axis="t")
    _open_nonlocal_blocks(model)
    engine = initialize(model, cfg, sp)
    x, y = _data("i3d")
    d = sp.dp_rank
    loss = F.cross_entropy(engine(shard_batch(x[d : d + 1], sp)), y[d : d + 1]) * loss_scale(cfg, sp)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.step()
    weights = {n: (safe_get_full_fp32_param(p) if stage else p).detach().clone() for n, p in engine.module.named_parameters()}
    buffers = {n: b.clone() for n, b in engine.module.named_buffers()}
    return (sp.sp_size, sp.dp_size, d), grads, weights, buffers


@pytest.mark.parametrize("stage", [2])
def test_dp_as_a_mesh_dim(stage):
    """Data parallel as a DeviceMesh dim: the gradient is the mean of the two clips' single-process
    gradients (each clip's BatchNorm statistics its own), the weights after the step follow it, and each
    data-parallel group's running statistics are those of its clip."""
    grads, buffers = [], []
    for d in range(2):  # each clip alone, as its data-parallel group sees it
        model = _open_nonlocal_blocks(_model("i3d")).double()
        x, y = _data("i3d")
        F.cross_entropy(model(x[d : d + 1].double()), y[d : d + 1]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        buffers.append(dict(model.named_buffers()))
    model = _open_nonlocal_blocks(_model("i3d")).double()
    mean_grad = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    params = _config(stage)["optimizer"]["params"]
    ref_weights = {n: p.detach() - params["lr"] * mean_grad[n] for n, p in model.named_parameters()}
    grad_scale = max(g.abs().max().item() for g in mean_grad.values())
    grad_tol, tol = TOL["i3d"]
    for (sp_size, dp_size, d), got_grads, weights, got_buffers in run_ranks(_mesh_worker, 4, stage, timeout=400):
        assert (sp_size, dp_size) == (2, 2)
        for key, ref in mean_grad.items():
            err = rel_err(got_grads[key], ref, floor=grad_scale)
            assert err <= grad_tol, f"dp {d} grad {key}: {err:.2e}"
        for key, ref in ref_weights.items():
            err = rel_err(weights[key], ref, floor=1e-2)
            assert err <= tol, f"dp {d} weight {key}: {err:.2e}"
        for key, ref in buffers[d].items():
            err = rel_err(got_buffers[key].to(ref.dtype), ref)
            assert err <= tol, f"dp {d} buffer {key}: {err:.2e}"


def _init_worker(rank, world, extensions_dir):
    from deepspeed.comm import comm
    from nonlocal_dist.integrations.deepspeed_sp import init_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), TORCH_EXTENSIONS_DIR=extensions_dir)
    init_distributed("gloo")
    return comm.cdb.shm_comm_op, sorted(os.listdir(extensions_dir))


def test_init_distributed_builds_no_shm_op(tmp_path):
    """DeepSpeed's start compiles its shared-memory op (minutes on a fresh machine, a file lock a killed
    rank leaves behind); ``init_distributed`` starts DeepSpeed's communication without it."""
    for op, built in run_ranks(_init_worker, 2, str(tmp_path), timeout=240):
        assert op is None and built == []
