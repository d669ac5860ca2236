"""insert_nonlocal: blocks land after the chosen residual blocks and leave a trained network's output unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nonlocal_dist import NonLocalBlock, insert_nonlocal
from nonlocal_dist.models import I3DNonLocal

SMALL = dict(stem_channels=8, widths=(8, 16, 16), depths=(1, 2, 2), strides=(1, 2, 1), inflate=((1,), (1, 0), (0, 1)),
             nonlocal_stages=())


def _trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics far from their initial values, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (0.3 if p.ndim == 1 else 0.0))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=m.running_var.dtype) + 0.5)
    return model


def _nonlocal_paths(model: nn.Module) -> list[str]:
    return [name.removesuffix(".non_local_block") for name, m in model.named_modules() if isinstance(m, NonLocalBlock)]


@pytest.mark.parametrize("train", [False, True])
def test_inserted_blocks_leave_a_trained_network_unchanged(train):
    before = _trained_looking(I3DNonLocal(2, 5, **SMALL)).double().train(train)
    after = insert_nonlocal(copy.deepcopy(before), ((0,), (1, 1), (1, 0))).double().train(train)
    assert _nonlocal_paths(after) == ["layer2.0", "layer2.1", "layer3.0"]
    x = torch.randn(2, 2, 8, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # in training mode the second forward also sees the updated BatchNorm statistics
        assert torch.equal(after(x), before(x))
    old = dict(before.named_buffers())
    for name, buf in after.named_buffers():
        if "non_local_block" not in name:
            assert torch.equal(buf, old[name]), name


def test_pretrained_state_dict_loads_into_the_inserted_network():
    source = _trained_looking(I3DNonLocal(2, 5, **SMALL))
    target = insert_nonlocal(I3DNonLocal(2, 5, **SMALL), ("layer1.0", "layer3.1"))
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and missing and all(".non_local_block." in key for key in missing)
    assert _nonlocal_paths(target) == ["layer1.0", "layer3.1"]


def test_block_channels_follow_the_residual_block():
    model = insert_nonlocal(I3DNonLocal(2, 5, **SMALL), ((1,), (0, 1), (0, 1)))
    assert [m.in_channels for m in model.modules() if isinstance(m, NonLocalBlock)] == [8, 16, 16]
    blocks = [m for m in model.modules() if isinstance(m, NonLocalBlock)]
    assert all(b.sub_sample == {"h": 2, "w": 2} and b.mode == "embedded_gaussian" for b in blocks)



@pytest.mark.parametrize("norm", ["batch", None])
def test_zero_init_false_opens_the_blocks_for_training_from_scratch(norm):
    """Zero init (the default): theta, phi and g get no gradient until the output weight grows;
    ``zero_init=False``: they get one at the first step and the network's output changes."""
    x = torch.randn(2, 2, 8, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for zero_init in (True, False):
        torch.manual_seed(0)
        plain = I3DNonLocal(2, 5, **SMALL).double()
        model = insert_nonlocal(copy.deepcopy(plain), ("layer2.0",), norm=norm, zero_init=zero_init).double()
        block = model.layer2[0].non_local_block
        model(x).square().sum().backward()
        grads[zero_init] = [p.grad.abs().sum().item() for p in (block.theta.weight, block.phi.weight, block.g.weight)]
        assert torch.equal(model(x), plain(x)) == zero_init
        if norm == "batch":
            assert torch.equal(block.norm.weight, torch.full_like(block.norm.weight, 0.0 if zero_init else 1.0))
    assert grads[True] == [0.0, 0.0, 0.0]
    assert all(g > 0 for g in grads[False])

class _NoOutChannels(nn.Module):
    """A residual block without ``out_channels``: its channels come from its last BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, 2 * channels, 1)
        self.bn = nn.BatchNorm3d(2 * channels)
        self.proj = nn.Conv3d(channels, 2 * channels, 1)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.proj(x))


class _Stages(nn.Module):
    def __init__(self, layer1: nn.Module) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(layer1)

    def forward(self, x):
        return self.layer1(x)


def test_channels_from_the_last_norm_or_conv():
    model = insert_nonlocal(_Stages(_NoOutChannels(3)), ((1,),), mode="dot_product", sub_sample=None)
    assert model.layer1[0].non_local_block.in_channels == 6
    assert model.layer1[0].non_local_block.mode == "dot_product"
    assert model(torch.randn(1, 3, 2, 4, 4)).shape == (1, 6, 2, 4, 4)


def test_unknown_channels_name_the_module():
    with pytest.raises(ValueError, match=r"layer1\.0 \(ReLU\).*out_channels"):
        insert_nonlocal(_Stages(nn.ReLU()), ((1,),))


@pytest.mark.parametrize("after, error, match", [
    (((1,), (1, 0)), ValueError, r"lengths \[1, 2, 2\]"),
    (((1,), (1, 0), (2, 0)), ValueError, "one 0/1"),
    (("layer9.0",), ValueError, r"no module at \['layer9.0'\]"),
    ("layer2.0", TypeError, "per-stage mask"),
])
def test_bad_choices_say_what_is_expected(after, error, match):
    with pytest.raises(error, match=match):
        insert_nonlocal(I3DNonLocal(2, 5, **SMALL), after)


def test_second_insertion_and_models_without_stages_are_refused():
    model = insert_nonlocal(I3DNonLocal(2, 5, **SMALL), ("layer2.0",))
    with pytest.raises(ValueError, match="already has a 'non_local_block'"):
        insert_nonlocal(model, ("layer2.0",))
    with pytest.raises(ValueError, match="no children layer1"):
        insert_nonlocal(nn.Sequential(nn.Conv3d(1, 1, 1)), ((1,),))


def test_torchvision_r3d_18():
    video = pytest.importorskip("torchvision.models.video")
    before = _trained_looking(video.r3d_18(num_classes=4)).eval()
    after = insert_nonlocal(copy.deepcopy(before), ((0, 0), (1, 0), (1, 0), (0, 0)))
    assert [m.in_channels for m in after.modules() if isinstance(m, NonLocalBlock)] == [128, 256]
    x = torch.randn(1, 3, 4, 32, 32)
    assert torch.equal(after(x), before(x))
