"""I3DNonLocal on one device: shapes, gradients, determinism, inflation and strides."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nonlocal_dist import NonLocalBlock
from nonlocal_dist.models import I3DNonLocal


def _model(seed: int = 0, **kwargs) -> I3DNonLocal:
    torch.manual_seed(seed)
    return I3DNonLocal(2, 3, **kwargs).double()


def _open_nonlocal_blocks(model: nn.Module) -> nn.Module:
    """Leave the identity initialisation so that every non-local parameter gets a gradient."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NonLocalBlock):
                m.norm.weight.fill_(0.7)
    return model


def _clip(batch: int = 2, frames: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 2, frames, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def test_default_network_shapes_and_gradients():
    model = _open_nonlocal_blocks(_model())
    x = _clip().requires_grad_()
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.square().sum().backward()
    assert x.grad.shape == x.shape and x.grad.abs().max() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.abs().max() > 0, name
    # The paper's pattern: non-local blocks after every other block of the middle stages.
    paths = [n for n, m in model.named_modules() if isinstance(m, NonLocalBlock)]
    assert paths == ["layer2.0.non_local_block", "layer3.0.non_local_block"]


def test_feature_shapes_follow_the_strides():
    model = _model()
    sizes = {}

    def record(name):
        def hook(module, inputs, output):
            sizes[name] = tuple(output.shape)
        return hook

    for name in ("stem", "pool", "layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(record(name))
    model(_clip(1, 8, 32))
    # stem stride (1, 2, 2), pool stride (2, 2, 2), stages spatial strides (1, 2, 2)
    assert sizes == {"stem": (1, 16, 8, 16, 16), "pool": (1, 16, 4, 8, 8), "layer1": (1, 32, 4, 8, 8),
                     "layer2": (1, 64, 4, 4, 4), "layer3": (1, 128, 4, 2, 2)}


def test_deterministic():
    x = _clip()
    first, second = _model(seed=5), _model(seed=5)
    assert torch.equal(first(x), second(x))
    first.eval()
    assert torch.equal(first(x), first(x))


@pytest.mark.parametrize("style, conv", [("3x1x1", "conv1"), ("3x3x3", "conv2")])
def test_inflation_mask_and_style(style, conv):
    model = _model(inflate=((1,), (0, 1), (1, 0)), inflate_style=style)
    temporal = {f"layer{i}.{j}": getattr(model.get_submodule(f"layer{i}.{j}"), conv).kernel_size[0]
                for i, depth in ((1, 1), (2, 2), (3, 2)) for j in range(depth)}
    assert temporal == {"layer1.0": 3, "layer2.0": 1, "layer2.1": 3, "layer3.0": 3, "layer3.1": 1}
    other = "conv2" if conv == "conv1" else "conv1"
    assert all(m.kernel_size[0] == 1 for n, m in model.named_modules() if n.endswith(other))


def test_ablation_has_no_nonlocal_blocks():
    for stages in ((), ((0,), (0, 0), (0, 0))):
        model = _model(nonlocal_stages=stages)
        assert not any(isinstance(m, NonLocalBlock) for m in model.modules())
        assert model(_clip(1)).shape == (1, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(inflate_style="2x1x1"), "inflate_style"),
    (dict(depths=(1, 2)), "one entry per stage"),
    (dict(inflate=((1,), (1,), (1, 0))), "one 0/1 per block"),
    (dict(stem_kernel=(3, 5)), "stem_kernel"),
    (dict(nonlocal_stages=((0,), (0, 0))), r"lengths \[1, 2, 2\]"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        I3DNonLocal(2, 3, **kwargs)


def test_main_job_ablation_cannot_see_both_digits():
    """configs/experiment_i3d.json: without non-local blocks no feature before the global pool sees
    more than ``min_gap`` consecutive frames, so none sees both digits (at least that far apart).
    In eval mode: training-mode BatchNorm mixes all positions, but only through per-channel sums."""
    exp = json.loads((Path(__file__).resolve().parents[2] / "configs/experiment_i3d.json").read_text())
    config = {key: value for key, value in exp["model"].items() if key != "name"}
    model = I3DNonLocal(1, 2, **{**config, "nonlocal_stages": ()}).double().eval()
    d = exp["data"]
    x = torch.randn(1, 1, d["frames"], d["size"], d["size"], dtype=torch.float64, requires_grad=True)
    features = {}
    model.avgpool.register_forward_pre_hook(lambda module, args: features.setdefault("x", args[0]))
    model(x)
    seen = []
    for t in range(features["x"].shape[2]):
        (grad,) = torch.autograd.grad(features["x"][:, :, t].sum(), x, retain_graph=True)
        frames = torch.nonzero(grad.abs().sum((0, 1, 3, 4))).flatten()
        seen.append(int(frames[-1] - frames[0]) + 1)
    assert max(seen) <= d["min_gap"], (seen, d["min_gap"])
    # With its non-local blocks one feature of the first time step sees every frame.
    model = _open_nonlocal_blocks(I3DNonLocal(1, 2, **config).double().eval())
    features.clear()
    model.avgpool.register_forward_pre_hook(lambda module, args: features.setdefault("x", args[0]))
    model(x)
    (grad,) = torch.autograd.grad(features["x"][:, :, 0].sum(), x)
    assert (grad.abs().sum((0, 1, 3, 4)) > 0).all()
