"""parallelize(model, group, axis) on real gloo ranks equals the single-process model in float64:
outputs, input gradient, every parameter gradient (summed over ranks) and BatchNorm statistics, for
1-3 ranks with uneven shards; nothing in the model is changed; refusals name the op and the line on
every rank."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from helpers import rel_err, torchvision_video
from sharded_parity import runtime_log
from torch import nn

from nonlocal_dist import NonLocalBlock, parallelize
from nonlocal_dist.sharded import ShardingRefusal
from nonlocal_dist.testing import run_ranks

TOL = 1e-10
ALIGNED8 = {1: [8], 2: [6, 2], 3: [4, 2, 2]}  # 8 positions, boundaries on the stride-2 grid


def _lengths(total: int, world: int, pattern: str) -> list[int]:
    """Uneven shard lengths: 'front' puts the remainder on rank 0, 'short' leaves rank 1 one position."""
    if world == 1:
        return [total]
    if pattern == "short":
        rest = total - 1
        return [rest - rest // 2, 1, rest // 2][:world] if world == 3 else [total - 1, 1]
    base = [total // world] * world
    base[0] += total - sum(base)
    return base


def _compare(model: nn.Module, shape: tuple, lengths: list[int], axis: str, rank: int, world: int) -> dict:
    """Run ``model`` whole and parallelized (input sharded as ``lengths``); relative errors by quantity."""
    layout = "b c t h w"[: 2 * len(shape) - 1] if len(shape) != 4 else "b c h w"
    if len(shape) == 3:
        layout = "b c t"
    group = dist.group.WORLD
    whole = model.double()
    sharded = parallelize(copy.deepcopy(whole), group, axis, layout=layout, sizes=[lengths])
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    xw, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yw, ys = whole(xw), sharded(xs)
    weight = torch.randn(yw.shape, generator=gen, dtype=torch.float64)
    (yw * weight).sum().backward()
    (ys * weight).sum().div(world).backward()  # every rank holds the whole output: loss / group size
    grad = xs.grad.clone()
    dist.all_reduce(grad)
    errors = {"output": rel_err(ys.detach(), yw), "input grad": rel_err(grad, xw.grad)}
    scale = max(p.grad.abs().max().item() for p in whole.parameters()) if list(whole.parameters()) else 1.0
    for (name, p), q in zip(sharded.named_parameters(), whole.parameters()):
        total = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(total)
        errors[f"grad {name}"] = rel_err(total, q.grad, floor=scale)
    for (name, b), c in zip(sharded.named_buffers(), whole.buffers()):
        errors[f"buffer {name}"] = rel_err(b.double(), c.double())
    return errors


def _seeded(build):
    torch.manual_seed(3)
    model = build()
    with torch.no_grad():  # random BatchNorm affine and non-local norm weights, so nothing is an identity
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _layer_cases(world: int):
    """(name, builder, input shape, shard lengths, axis)"""
    cases = []
    for k in range(1, 6):
        cases.append((f"conv3d k{k} same", lambda k=k: nn.Conv3d(2, 3, (k, 3, 1), padding=(k // 2, 1, 0)),
                      (2, 2, 7, 4, 3), _lengths(7, world, "short"), "t"))
    cases += [
        ("conv3d k3 valid", lambda: nn.Conv3d(2, 3, 3), (1, 2, 8, 5, 5), _lengths(8, world, "front"), "t"),
        ("conv3d dilation 2", lambda: nn.Conv3d(2, 2, 3, padding=2, dilation=2), (1, 2, 7, 4, 4), _lengths(7, world, "short"), "t"),
        ("conv3d 'same' k4", lambda: nn.Conv3d(2, 2, (4, 1, 1), padding="same"), (1, 2, 9, 3, 3), _lengths(9, world, "short"), "t"),
        ("conv3d k5 valid, 1-position shard", lambda: nn.Conv3d(2, 2, (5, 1, 1)), (1, 2, 9, 2, 2), _lengths(9, world, "short"), "t"),
        ("conv3d stride 2 aligned", lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1), (1, 2, 8, 6, 6), ALIGNED8[world], "t"),
        ("conv3d along h", lambda: nn.Conv3d(2, 2, 3, padding=1), (1, 2, 3, 7, 4), _lengths(7, world, "short"), "h"),
        ("conv3d reflect, 0 pad on t", lambda: nn.Conv3d(2, 2, (3, 3, 3), padding=(0, 1, 1), padding_mode="reflect"), (1, 2, 7, 4, 4), _lengths(7, world, "front"), "t"),
        ("conv2d along w", lambda: nn.Conv2d(2, 2, 3, padding=1, stride=(1, 2)), (2, 2, 5, 8), ALIGNED8[world], "w"),
        ("conv1d k4 pad 2", lambda: nn.Conv1d(2, 2, 4, padding=2), (2, 2, 9), _lengths(9, world, "short"), "t"),
        ("conv1d k1 s4", lambda: nn.Conv1d(2, 2, 1, stride=4), (1, 2, 16), {1: [16], 2: [8, 8], 3: [8, 4, 4]}[world], "t"),
        ("maxpool1d k2 s4 pad 1", lambda: nn.MaxPool1d(2, stride=4, padding=1), (1, 2, 14), {1: [14], 2: [8, 6], 3: [4, 8, 2]}[world], "t"),
        ("maxpool3d k3 s2", lambda: nn.MaxPool3d(3, stride=2, padding=1), (1, 2, 8, 4, 4), {1: [8], 2: [2, 6], 3: [2, 4, 2]}[world], "t"),
        ("maxpool3d k2 s2", lambda: nn.MaxPool3d((2, 1, 1)), (1, 2, 8, 3, 3), ALIGNED8[world], "t"),
        ("maxpool3d dilation 2", lambda: nn.MaxPool3d(3, stride=1, padding=1, dilation=2), (1, 2, 7, 5, 5), _lengths(7, world, "short"), "t"),
        ("avgpool3d include pad", lambda: nn.AvgPool3d(3, stride=1, padding=1), (1, 2, 7, 4, 4), _lengths(7, world, "short"), "t"),
        ("avgpool3d exclude pad", lambda: nn.AvgPool3d(3, stride=1, padding=1, count_include_pad=False), (1, 2, 7, 4, 4), _lengths(7, world, "short"), "t"),
        ("avgpool1d exclude pad s2", lambda: nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False), (2, 2, 8), ALIGNED8[world], "t"),
        ("batchnorm3d", lambda: nn.BatchNorm3d(2), (2, 2, 5, 3, 3), _lengths(5, world, "short"), "t"),
        ("instancenorm3d running stats", lambda: nn.InstanceNorm3d(2, affine=True, track_running_stats=True),
         (2, 2, 5, 3, 3), _lengths(5, world, "short"), "t"),
        ("groupnorm", lambda: nn.GroupNorm(1, 2), (2, 2, 5, 3, 3), _lengths(5, world, "short"), "t"),
        ("global pool", lambda: nn.Sequential(nn.AdaptiveAvgPool3d((1, 2, 2)), nn.Flatten(), nn.Linear(8, 3)), (2, 2, 7, 4, 4), _lengths(7, world, "short"), "t"),
    ]
    return cases


def _video_net() -> nn.Module:
    """conv3d + BN + ReLU + maxpool + NonLocalBlock + (3,1,1) conv + global pool + Linear."""
    block = NonLocalBlock(4, sub_sample={"h": 2, "w": 2})
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(inplace=True),
        nn.MaxPool3d((3, 3, 3), stride=(2, 2, 2), padding=1), block,
        nn.Conv3d(4, 6, (3, 1, 1), padding=(1, 0, 0)), nn.BatchNorm3d(6), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def _layers_worker(rank, world):
    failures = {}
    for name, build, shape, lengths, axis in _layer_cases(world):
        errors = _compare(_seeded(build), shape, lengths, axis, rank, world)
        bad = {k: v for k, v in errors.items() if v > TOL}
        if bad:
            failures[name] = bad
    return failures


def _net_worker(rank, world, lengths):
    model = _seeded(_video_net)
    with torch.no_grad():
        model[4].norm.weight.fill_(0.7)
    errors = {}
    for train in (True, False):
        model.train(train)
        errors.update({f"{k} ({'train' if train else 'eval'})": v
                       for k, v in _compare(copy.deepcopy(model), (2, 2, 10, 6, 6), lengths, "t", rank, world).items()})
    return {k: v for k, v in errors.items() if v > TOL}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_layers_equal_single_process(world):
    for failures in run_ranks(_layers_worker, world, timeout=300):
        assert not failures, failures


@pytest.mark.parametrize("world,lengths", [(1, [10]), (2, [6, 4]), (3, [4, 2, 4])])
def test_video_net_equals_single_process(world, lengths):
    for failures in run_ranks(_net_worker, world, lengths, timeout=300):
        assert not failures, failures


def _misaligned_worker(rank, world):
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 1, 3, stride=2, padding=1).double()
    plain = copy.deepcopy(conv)
    x = torch.randn(1, 1, 8, 4, 4, dtype=torch.float64)
    with runtime_log() as messages:
        error = (parallelize(conv, dist.group.WORLD, "t")(x) - plain(x)).abs().max().item()
    mismatch = parallelize(nn.Conv3d(1, 1, 3, padding=1), dist.group.WORLD, "t")
    with pytest.raises(ValueError, match="disagree"):
        mismatch(torch.randn(1, 1, 3, 4, 4 + (rank == 1)))
    return error, messages


def test_unaligned_stride_reshards_and_mismatch_raises_on_every_rank():
    """Shard lengths [3, 3, 2] put a stride-2 conv's windows off its grid: the boundaries move to
    [4, 2, 2] (logged once, with the bytes moved) and the result is exact; differing inputs raise on
    every rank."""
    for error, messages in run_ranks(_misaligned_worker, 3):
        assert error < 1e-12, error
        assert any("shard lengths [3, 3, 2]" in m and "resharded to [4, 2, 2]" in m and "bytes" in m
                   for m in messages), messages


class _RowsToChannels(nn.Module):
    """Rows and columns split into (h/2, 2) and (w/2, 2) and moved into the channels, as DCAE
    downsamples and Qwen-Image's AvgDown3D write it: by a ``view``, by ``unflatten`` (torch's view ops:
    the result aliases the input) or by a view that also merges the row pairs with the columns
    (``"merge"``); ``write`` writes in place into the split (``"split"``) or into its input after the
    split was taken (``"source"``)."""

    def __init__(self, by: str = "view", write: str = "") -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 2, 3, padding=1)
        self.by, self.write = by, write

    def forward(self, x):
        x = self.conv(x)
        b, c, t, h, w = x.shape
        if self.by == "unflatten":
            rows = x.unflatten(3, (h // 2, 2)).unflatten(5, (w // 2, 2))
        elif self.by == "merge":
            rows = x.view(b, c, t, h // 2, 2 * w).view(b, c, t, h // 2, 2, w // 2, 2)
        else:
            rows = x.view(b, c, t, h // 2, 2, w // 2, 2)
        if self.write == "split":
            rows.mul_(2.0)
        elif self.write == "source":
            x.mul_(2.0)
        return rows.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * 4, t, h // 2, w // 2) + x.mean()


def _rows_worker(rank, world, lengths, by, write):
    model = _seeded(lambda: _RowsToChannels(by, write))
    if not write:
        with runtime_log() as messages:
            errors = _compare(model, (2, 2, 3, 8, 4), lengths, "h", rank, world)
        return {k: v for k, v in errors.items() if v > TOL}, messages
    sharded = parallelize(model.double(), dist.group.WORLD, "h", sizes=[lengths])
    x = torch.randn(2, 2, 3, 8, 4, dtype=torch.float64)
    try:
        out = sharded(x)
    except ShardingRefusal as exc:
        return str(exc), []
    return (out - model(x)).abs().max().item(), []


@pytest.mark.parametrize("world,lengths", [(2, [5, 3]), (3, [3, 5, 0]), (2, [4, 4])])
@pytest.mark.parametrize("by", ["view", "unflatten", "merge"])
def test_a_view_off_the_shard_boundaries_reshards_and_is_exact(by, world, lengths):
    """Rows split [5, 3] under a view into pairs: the boundaries move onto the pairs' grid (one
    all-to-all, logged: the view is of that copy) and the output and every gradient are exact, a view
    that also merges the pairs with the columns included; an even split needs no move (a view of the
    shard itself)."""
    for failures, messages in run_ranks(_rows_worker, world, lengths, by, "", timeout=120):
        assert not failures, failures
        moved = [m for m in messages if "resharded to" in m and "the view is of that copy" in m]
        assert moved if lengths != [4, 4] else not moved, messages


@pytest.mark.parametrize("write", ["split", "source"])
@pytest.mark.parametrize("by", ["view", "unflatten"])
def test_a_write_into_a_resharded_view_or_its_source_is_refused_on_every_rank(by, write):
    """The resharded view is a copy: a write into it would not reach its input, nor a write into the
    input the view; both are refused on every rank, naming the user's line. On an even split the view
    is the shard itself and both writes run exact."""
    messages = [m for m, _ in run_ranks(_rows_worker, 2, [5, 3], by, write, timeout=120)]
    assert all(isinstance(m, str) and "resharded" in m and "test_parallelize.py" in m for m in messages), messages
    for error, _ in run_ranks(_rows_worker, 2, [4, 4], by, write, timeout=120):
        assert error < TOL, error


class _Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, x, deep: bool = False):
        return self.conv(self.conv(x)) if deep else self.conv(x)


def _agreement_worker(rank, world):
    x = torch.randn(1, 2, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(rank)  # each rank builds its own weights
    differing = parallelize(_Flagged(), dist.group.WORLD, "t")
    with pytest.raises(ValueError) as weights:
        differing(x)
    torch.manual_seed(rank)
    model = _Flagged()
    built = model.conv.weight.sum().item()
    synced = parallelize(model, dist.group.WORLD, "t", sync_module_states=True)
    torch.manual_seed(0)
    want = _Flagged()(x)  # rank 0's weights
    got = synced(x)
    with pytest.raises(ValueError) as flag:
        synced(x, deep=rank == 1)  # a Python argument that differs between ranks
    return str(weights.value), (got - want).abs().max().item(), str(flag.value), built


def test_parameters_and_arguments_agreed_or_synced_from_rank_zero():
    results = run_ranks(_agreement_worker, 3, timeout=120)
    for weights, error, flag, _ in results:
        assert "parameters or buffers differ between ranks (conv.weight, conv.bias)" in weights, weights
        assert "sync_module_states=True" in weights
        assert error < 1e-6, error
        assert "inputs per rank" in flag and "True" in flag and "False" in flag, flag
    assert len({r[3] for r in results}) == 3  # the weights really were built differently


def _identity_worker(rank, world):
    torch.manual_seed(0)  # the same weights on every rank (parallelize checks them)
    model = _video_net()
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    keys = list(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    out = parallelize(model, dist.group.WORLD, "t")
    copied = copy.deepcopy(model)  # EMA helpers copy the model
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a saved model runs plain (no mesh travels)
    x = torch.randn(2, 2, 8, 4, 4)
    same_copy = torch.equal(copied(x), model(x))
    loaded_runs = loaded(x).shape == (2, 3)
    return (out is model, params == [id(p) for p in model.parameters()], buffers == [id(b) for b in model.buffers()],
            keys == list(model.state_dict()), kinds == [type(m) for m in model.modules()], same_copy, loaded_runs)


def test_parallelize_changes_nothing_in_the_model():
    for result in run_ranks(_identity_worker, 2):
        assert result == (True,) * 7, result


class _SortFrames(nn.Module):
    def forward(self, x):
        return x.sort(dim=2).values  # an order over the sharded frames: refused


def _refusal_worker(rank, world):
    torch.manual_seed(0)  # the same weights on every rank (parallelize checks them)
    group = dist.group.WORLD
    cases = [
        (nn.Sequential(nn.Flatten(), nn.Linear(96, 2)), r"linear along sharded dim 1.*contracts the sharded last dim"),
        (nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(192, 2)), r"linear along sharded dim 1.*contracts the sharded last dim"),  # flatten moved the shard to c
        (nn.Sequential(nn.MaxPool3d(3, ceil_mode=True)), "ceil_mode"),
        (nn.Sequential(nn.AdaptiveAvgPool3d((2, 1, 1))), "output size 2"),
        (nn.Sequential(nn.Conv3d(1, 1, 3, padding=3)), "exceeds the window's extent"),
        (nn.Sequential(NonLocalBlock(1, axes="h w")), "interacting axes"),
        (nn.Sequential(nn.Conv3d(1, 1, 3, padding=1), _SortFrames()), "Tensor.sort along sharded dim 2.*acts along the sharded dim"),
    ]
    messages = []
    for model, pattern in cases:
        with pytest.raises(ShardingRefusal, match=pattern) as info:
            parallelize(model, group, "t")(torch.randn(1, 1, 6, 4, 4))
        messages.append(str(info.value))
    with pytest.raises(TypeError, match="ProcessGroup"):
        parallelize(nn.Conv3d(1, 1, 3), None, "t")
    # Position-wise layers and a head after the global pool run; LayerNorm over the unsharded channels too.
    kept = parallelize(nn.Sequential(nn.Conv3d(1, 2, (1, 3, 3)), nn.GELU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                                     nn.Linear(2, 2), nn.LayerNorm(2)), group, "t")
    return messages, kept(torch.randn(1, 1, 6, 4, 4)).shape


def test_refusals_name_the_op_and_the_line_on_every_rank():
    for messages, shape in run_ranks(_refusal_worker, 2):
        assert shape == (1, 2)
        assert all("test_parallelize.py" in m for m in messages), messages


def _sort_frames(x):  # a library's shared helper: the refusal names the model's line too
    return x.sort(dim=2).values


class _CallsHelper(nn.Module):
    def forward(self, x):
        return _sort_frames(x) * 2


def _helper_refusal_worker(rank, world):
    try:
        parallelize(_CallsHelper(), dist.group.WORLD, "t")(torch.randn(1, 1, 6, 2, 2))
    except ShardingRefusal as exc:
        return str(exc)
    return None


def test_a_refusal_inside_a_helper_names_the_lines_that_called_it():
    for message in run_ranks(_helper_refusal_worker, 2):
        assert message is not None and "(_sort_frames): return x.sort(dim=2).values" in message, message
        assert "[called from " in message and "(forward): return _sort_frames(x) * 2" in message, message


def _torchvision_model(name: str) -> nn.Module:
    video = torchvision_video()
    if name == "swin3d":  # Swin3D-T's code, small: windows of 2 x 4 x 4 tokens, shifted
        return video.swin_transformer.SwinTransformer3d(
            patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 4, 4], num_classes=3,
            stochastic_depth_prob=0.0)
    if name == "mvit":  # MViT-v2's code, small: a class token, pooled keys, relative positions
        block = video.mvit.MSBlockConfig
        return video.mvit.MViT(
            spatial_size=(32, 32), temporal_size=8, residual_pool=True, residual_with_cls_embed=False,
            rel_pos_embed=True, proj_after_attn=True, stochastic_depth_prob=0.0, dropout=0.0, num_classes=3, block_setting=[
                block(num_heads=1, input_channels=16, output_channels=16, kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3],
                      stride_q=[1, 1, 1], stride_kv=[1, 4, 4]),
                block(num_heads=2, input_channels=16, output_channels=32, kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3],
                      stride_q=[1, 2, 2], stride_kv=[1, 2, 2])])
    return getattr(video, name)(num_classes=3)


def _torchvision_worker(rank, world, name, shape, lengths):
    errors = _compare(_seeded(lambda: _torchvision_model(name)), shape, lengths, "t", rank, world)
    return {k: v for k, v in errors.items() if v > 1e-9}


_TORCHVISION = {  # name -> (input shape, shard lengths)
    "r3d_18": ((1, 3, 16, 32, 32), [8, 8]),  # 3 temporal stride-2 stages
    "r2plus1d_18": ((1, 3, 16, 32, 32), [8, 8]),
    "swin3d": ((1, 3, 12, 32, 32), [8, 4]),  # its window partition is a view: shards on the grid of 2 x 2 frames
    "mvit": ((1, 3, 8, 32, 32), [5, 3]),  # any split: the stride-2 patch conv reshards it onto its grid
}


@pytest.mark.parametrize("name", sorted(_TORCHVISION))
def test_torchvision_video_models(name):
    """torchvision's video ResNets and its video transformers (Swin3D's shifted windows, MViT's class
    token, pooled attention and relative positions), unchanged code, on 2 ranks: outputs, input and
    parameter gradients against one process."""
    torchvision_video()
    for failures in run_ranks(_torchvision_worker, 2, name, *_TORCHVISION[name], timeout=600):
        assert not failures, failures


def _i3d_worker(rank, world, lengths):
    from nonlocal_dist.models import I3DNonLocal

    def build():
        model = I3DNonLocal(3, 4, stem_channels=8, widths=(8, 16, 16), depths=(1, 2, 1), strides=(1, 2, 2),
                            inflate=((1,), (1, 1), (1,)), nonlocal_stages=((1,), (1, 0), (1,)))
        for block in model.modules():
            if isinstance(block, NonLocalBlock):
                nn.init.uniform_(block.norm.weight, 0.5, 1.0)  # not the identity init, so the blocks matter
        return model

    errors = _compare(_seeded(build), (2, 3, 8, 32, 32), lengths, "t", rank, world)
    return {k: v for k, v in errors.items() if v > TOL}


@pytest.mark.parametrize("world,lengths", [(2, [4, 4]), (3, [4, 2, 2])])
def test_i3d_with_nonlocal_blocks_equals_single_process(world, lengths):
    for failures in run_ranks(_i3d_worker, world, lengths, timeout=300):
        assert not failures, failures


def _bf16_norm_worker(rank, world):
    """DeepSpeed's bf16: bf16 input and parameters, float32 running statistics (group_batch_norm's path)."""
    torch.manual_seed(0)
    whole = nn.BatchNorm3d(3)
    sharded = parallelize(nn.Sequential(copy.deepcopy(whole)), dist.group.WORLD, "t", sizes=[[4, 3]])
    for p in sharded.parameters():
        p.data = p.data.bfloat16()
    x = torch.randn(2, 3, 7, 4, 4, generator=torch.Generator().manual_seed(1))
    want = whole.double()(x.double())
    got = sharded(x.bfloat16().requires_grad_())
    got.float().sum().backward()
    return rel_err(got.detach().float(), want), rel_err(sharded[0].running_var, whole.running_var), got.dtype


def test_bf16_batchnorm_with_float32_statistics():
    for out_err, stats_err, dtype in run_ranks(_bf16_norm_worker, 2):
        assert dtype == torch.bfloat16 and out_err < 2e-2 and stats_err < 1e-2, (out_err, stats_err)


def _retained_bytes(fn) -> int:
    """Bytes that torch's allocator still holds after ``fn()`` beyond those held before (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    retained = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    del out
    return retained


def _saved_input_worker(rank, world):
    """A sharded window layer keeps no copy of its extended shard for backward (it rebuilds it), and an
    in-place change of its input before the backward raises instead of giving a wrong gradient."""
    from nonlocal_dist.sharded import distribute

    torch.manual_seed(0)
    whole = nn.Sequential(nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0)), nn.MaxPool3d((3, 1, 1), 1, (1, 0, 0)))
    x = distribute(torch.randn(1, 4, 32, 16, 16), dist.group.WORLD, "b c t h w", "t").requires_grad_()
    local = x.to_local()
    shard_bytes = local.numel() * local.element_size()
    kept, y, yl = {}, x * 1.0, local * 1.0  # the layers' inputs, alive beforehand (the layer before saved them)
    for name, layer, inp in (("plain conv", whole[0], yl), ("sharded conv", whole[0], y),
                             ("plain pool", whole[1], yl), ("sharded pool", whole[1], y)):
        kept[name] = [_retained_bytes(lambda: layer(inp)) for _ in range(2)][-1] / shard_bytes
    y = x * 1.0
    out = whole[0](y)
    y.add_(1.0)
    try:
        out.sum().backward()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    dist.barrier()
    return kept, error


@pytest.mark.skipif(not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"),
                    reason="this torch has no accessor for the outer saved-tensor hooks: the layers save a copy")
def test_window_layers_keep_no_copy_of_the_shard():
    for kept, error in run_ranks(_saved_input_worker, 2):
        # retained beyond the plain layer's: the two halo positions (1/8 shard), not the extended shard (+9/8)
        assert kept["sharded conv"] < kept["plain conv"] + 0.5, kept
        assert kept["sharded pool"] < kept["plain pool"] + 0.5, kept
        assert error is not None and "in-place" in error, error


def _head_dropout_worker(rank, world):
    """Dropout after the global pool, and a channel dropout on the sharded activation: every rank draws
    the same masks although each rank's own RNG differs from the others'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 64, (3, 1, 1), padding=(1, 0, 0)), nn.Dropout3d(0.5), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 3))
    parallelize(model, dist.group.WORLD, "t")
    torch.manual_seed(100 + rank)  # each rank's own RNG stream, as after differing data loading
    x = torch.randn(4, 2, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    dropped = torch.stack([model(x) for _ in range(10)])
    model.eval()
    return dropped, model(x)


def test_head_dropout_draws_one_mask_on_every_rank():
    (first, plain), (second, _) = run_ranks(_head_dropout_worker, 2)
    assert torch.equal(first, second)  # the same logits: the same masks, step after step, on both ranks
    assert not torch.equal(first[0], first[1]) and not torch.allclose(first[0], plain)


def _eval_on_one_rank_worker(rank, world, change):
    """A non-local block put in eval mode, or given another setting, on one rank alone is refused on
    every rank (the agreement compares each module's training flag and each block's settings), and so
    is a module added after the first call (the agreement's cached list of modules is walked again)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 8, (3, 1, 1), padding=(1, 0, 0)), NonLocalBlock(8, layout="b c t h w"))
    sharded = parallelize(model, dist.group.WORLD, "t", output="local")
    x = torch.randn(1, 2, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    sharded(x)
    if rank == 1:
        if change == "eval":
            sharded[1].eval()
        elif change == "scale":
            sharded[1].scale = 0.5
    if change == "added":
        sharded.append(nn.Dropout(0.0))
        sharded(x)  # agreed: the new module trains on every rank
        if rank == 1:
            sharded[2].eval()
    try:
        sharded(x)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("change", ["eval", "scale", "added"])
def test_block_in_eval_mode_on_one_rank_is_refused_on_every_rank(change):
    for message in run_ranks(_eval_on_one_rank_worker, 2, change, timeout=60):
        assert message is not None and "training modes and block settings" in message, message


def _one_rank_worker(rank, world, device):
    """The I3D with non-local blocks parallelized over a group of one on ``device``: the sharded layers'
    own code (group BatchNorm's fused kernels, the halo Function, the rebuilt saved input, the op rules,
    the strategies) against the unchanged model, float32 without TF32, two forward+backward passes."""
    from nonlocal_dist.models import I3DNonLocal

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    plain = I3DNonLocal(3, 5, stem_channels=8, widths=(16, 32, 64)).to(device)
    sharded = parallelize(copy.deepcopy(plain), dist.group.WORLD, "t")
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    errors = {}
    for step in range(2):
        plain.zero_grad(), sharded.zero_grad()
        yp, ys = plain(x), sharded(x)
        yp.square().sum().backward()
        ys.square().sum().backward()
        errors[f"logits {step}"] = rel_err(ys, yp)
        scale = max(q.grad.abs().max().item() for q in plain.parameters())
        for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
            errors[f"grad {name} {step}"] = rel_err(p.grad, q.grad, floor=scale)
    for (name, b), c in zip(sharded.named_buffers(), plain.buffers()):
        errors[f"buffer {name}"] = rel_err(b.double(), c.double())
    return {k: v for k, v in errors.items() if not v <= 1e-4}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_one_rank_group_equals_the_plain_model(device):
    (failures,) = run_ranks(_one_rank_worker, 1, device, timeout=240, backend="nccl" if device == "cuda" else "gloo")
    assert not failures, failures


def _compiled_worker(rank, world):
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.AdaptiveAvgPool3d(1))
    x = torch.randn(2, 3, 8, 4, 4)
    want = net(x)
    model = torch.compile(parallelize(net, dist.group.WORLD, "t"))
    dynamo.reset()
    try:
        got = model(x)
    except Exception as exc:  # dynamo wraps the error (InternalTorchDynamoError)
        return str(exc)
    return (got - want).abs().max().item()


def test_torch_compile_of_a_parallelized_network_is_refused_or_runs_eagerly():
    """torch 2.13 stops at the first op traced on a ShardedTensor, with the refusal on every rank;
    torch 2.8's dynamo traces the sharding itself, meets the refusal there, and falls back to
    running the hooks and the network eagerly: exact."""
    outcomes = run_ranks(_compiled_worker, 2, timeout=300)
    assert type(outcomes[0]) is type(outcomes[1]), outcomes
    for outcome in outcomes:
        if isinstance(outcome, str):
            assert "torch.compile cannot trace ops on a ShardedTensor" in outcome, outcome
        else:
            assert outcome < 1e-5, outcome


def _agreements_per_forward_worker(rank, world):
    """Two non-local blocks (one sub-sampled along the sharded t) under parallelize: the forward makes one
    agreement, the pre-hook's; the blocks take every rank's N and M from the spec. Exact against one process."""
    import nonlocal_dist.distributed.checks as checks

    calls = []
    gather = checks.all_gather_into

    def counting(*args, **kwargs):
        calls.append(1)
        return gather(*args, **kwargs)

    checks.all_gather_into = counting
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv3d(2, 8, (3, 1, 1), padding=(1, 0, 0)),
            NonLocalBlock(8, layout="b c t h w", mode="embedded_gaussian", sub_sample={"t": 2, "h": 2}, norm="batch"),
            NonLocalBlock(8, layout="b c t h w", mode="dot_product"),
        ).double()
        plain = copy.deepcopy(model)
        sharded = parallelize(model, dist.group.WORLD, "t", sizes=[[6, 2]] if world == 2 else None)
        x = torch.randn(2, 2, 8, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        sharded(x)  # the first call also checks the parameters (the same single agreement)
        calls.clear()
        out = sharded(x)
        counted = len(calls)
        expected = plain(x)
    finally:
        checks.all_gather_into = gather
    return counted, rel_err(out, expected)


@pytest.mark.parametrize("world", [1, 2])
def test_one_agreement_per_forward_however_many_blocks(world):
    for counted, err in run_ranks(_agreements_per_forward_worker, world, timeout=120):
        assert counted == (0 if world == 1 else 1), counted
        assert err < TOL, err


class _TextConditioned(nn.Module):
    """Video tokens (b, n, c) conditioned on text tokens (b, m, c) and a timestep (b,), as a diffusion
    transformer's forward takes them; records whether the text arrived whole."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.lin, self.proj = nn.Linear(c, c), nn.Linear(c, c)
        self.text_was_whole = None

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        from nonlocal_dist.sharded import ShardedTensor

        self.text_was_whole = not isinstance(encoder_hidden_states, ShardedTensor)
        context = self.proj(encoder_hidden_states).mean(1, keepdim=True)
        return self.lin(hidden_states) + context * timestep[:, None, None]


def _chosen_inputs_worker(rank, world, by_position):
    torch.manual_seed(0)
    model = _TextConditioned().double()
    plain = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 7, 6, dtype=torch.float64, generator=gen), torch.randn(2, 7, 6, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.5, 2.0], dtype=torch.float64)
    sharded = parallelize(model, dist.group.WORLD, "n", layout="b n c", inputs=(0,) if by_position else ("hidden_states",))
    out = sharded(x, encoder_hidden_states=text, timestep=t) if by_position else sharded(x, text, t)
    return model.text_was_whole, rel_err(out, plain(x, text, t))


@pytest.mark.parametrize("by_position", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_inputs_picks_what_is_sharded_and_the_rest_stays_whole(world, by_position):
    for whole, err in run_ranks(_chosen_inputs_worker, world, by_position, timeout=120):
        assert whole is True  # the text (as many dims as the layout) was not sharded
        assert err < TOL, err


class _Clips(nn.Module):
    """A list of clips of different lengths (b, n_i, c), as Cosmos 3 takes its vision tokens."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.seen = None

    def forward(self, clips, scale):
        from nonlocal_dist.sharded import ShardedTensor

        self.seen = [isinstance(x, ShardedTensor) for x in clips] + [isinstance(scale, ShardedTensor)]
        return torch.cat([self.lin(x) for x in clips], dim=1) * scale


def _list_input_worker(rank, world):
    torch.manual_seed(0)
    model = _Clips().double()
    plain = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    clips = [torch.randn(2, n, 6, dtype=torch.float64, generator=gen) for n in (5, 3)]
    scale = torch.randn(2, 8, 6, dtype=torch.float64, generator=gen)  # as many dims as the layout: kept whole
    sharded = parallelize(model, dist.group.WORLD, "n", layout="b n c", inputs=("clips",))
    return rel_err(sharded(clips, scale), plain(clips, scale)), model.seen


def test_inputs_shards_each_tensor_of_a_list_input():
    for err, seen in run_ranks(_list_input_worker, 2, timeout=120):
        assert err < TOL and seen == [True, True, False], (err, seen)


def test_inputs_naming_no_parameter_is_refused_at_parallelize():
    with pytest.raises(ValueError, match="'latents', which is not a parameter of _TextConditioned.forward"):
        parallelize(_TextConditioned(), object(), "n", layout="b n c", inputs=("latents",))


def _strategy_backend_worker(rank, world, strategy, backend):
    torch.manual_seed(0)
    block = NonLocalBlock(4, layout="b c t h w", backend=backend)
    model = parallelize(nn.Sequential(block), dist.group.WORLD, "t", strategy=strategy)
    block(torch.randn(1, 4, 4, 2, 2))  # a plain tensor: the block runs on one device, no strategy to check
    try:
        model(torch.randn(1, 4, 4, 2, 2))
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("strategy, backend, refused", [("ring", "reference", True), ("ring", "blocked", False),
                                                        ("allgather", "reference", False)])
def test_a_block_on_a_group_of_one_refuses_what_two_ranks_refuse(strategy, backend, refused):
    """A strategy that cannot honour the block's backend (the ring runs per-block kernels, not the
    reference formula) is refused on a group of one as on two ranks, with the same message, although
    a group of one runs no strategy: a configuration tried on one process fails there, not at scale.
    The same block given a plain tensor runs on one device, its strategy unused and unchecked."""
    alone = run_ranks(_strategy_backend_worker, 1, strategy, backend, timeout=120)
    pair = run_ranks(_strategy_backend_worker, 2, strategy, backend, timeout=120)
    for message in alone + pair:
        assert (message is not None) == refused, message
        if refused:
            assert f"strategy {strategy!r}" in message and f"backend={backend!r}" in message, message


class _FlexAttention(nn.Module):
    def forward(self, x):  # (b, n, c): torch's own flex attention, as a name bound before nonlocal_dist's import
        from nonlocal_dist.sharded.rules.flex import _plain_flex as flex_attention

        q = x[:, None]
        return flex_attention(q, q, q)[:, 0]


def _flex_worker(rank, world):
    model = parallelize(_FlexAttention(), dist.group.WORLD, "n", layout="b n c")
    try:
        with torch.no_grad():
            model(torch.randn(1, 8, 16))
    except Exception as exc:  # noqa: BLE001 - dynamo wraps the refusal in its own error type
        return str(exc)
    return None


def test_flex_attention_on_sharded_tokens_names_the_line_and_another_backend():
    for message in run_ranks(_flex_worker, 2, timeout=120):
        assert message is not None and "flex_attention cannot run on a ShardedTensor" in message, message
        assert "test_parallelize.py" in message and "import nonlocal_dist first" in message, message


class _Autoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Conv3d(1, 1, 1)

    def decode(self, z):  # calls its submodule directly: parallelize's hooks on forward are passed by
        return self.decoder(z)

    def forward(self, z):
        return self.decode(z)


def _decode_warning_worker(rank, world):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallelize(_Autoencoder(), dist.group.WORLD, "t")
        parallelize(nn.Conv3d(1, 1, 1), dist.group.WORLD, "t")  # no encode/decode: no warning
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_parallelize_warns_that_a_models_own_decode_runs_unsharded():
    for messages in run_ranks(_decode_warning_worker, 1, timeout=60):
        assert len(messages) == 1 and "_Autoencoder.forward only" in messages[0], messages
        assert "decode" in messages[0] and "model.decoder" in messages[0], messages
