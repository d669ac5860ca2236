"""diffusers' video transformers, unchanged, on sharded video tokens (issue 25): built from small
configs (no weights), float64, the text, timestep and mask whole on every rank (``parallelize(...,
inputs=("hidden_states",))``), 1-3 gloo ranks with uneven and empty shards, against one process:
the output, the gradient of the video tokens and every parameter gradient summed over the ranks.
diffusers is an optional extra (``pip install -e .[diffusers]``): the tests skip, saying why, without it."""
from __future__ import annotations

import copy

import pytest
import torch

from nonlocal_dist.testing import run_ranks

try:
    import diffusers
except Exception as exc:  # noqa: BLE001  (absent, or not importable beside this torch: skip with the reason)
    pytest.skip(f"diffusers is not usable here ({type(exc).__name__}: {exc}); pip install -e .[diffusers]",
                allow_module_level=True)

FRAMES, HEIGHT, WIDTH = 3, 2, 2  # 12 video tokens
SIZES = {1: [[12]], 2: [[8, 4]], 3: [[5, 7, 0]]}


def _ltx():
    torch.manual_seed(0)
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=12).double().eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, FRAMES * HEIGHT * WIDTH, 4, dtype=torch.float64, generator=g)
    text = torch.randn(2, 5, 12, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])  # text padding, as LTX's pipeline passes it
    t = torch.tensor([500, 20])
    w = torch.randn(2, FRAMES * HEIGHT * WIDTH, 4, dtype=torch.float64, generator=g)
    return x, text, t, mask, w


def _against_one_process(plain, sharded, model, call, x, w, world: int, relative: bool = False):
    """``call(m, x)`` -> output, for the one-process ``plain`` and the parallelized ``sharded`` (whose
    module is ``model``): the output, the gradient of x and every parameter gradient summed over the
    ranks, against one process (max absolute or relative error); and the error function of parameter
    gradients (name -> gradient) against the one process's."""
    import torch.distributed as dist

    ref_x = x.clone().requires_grad_(True)
    ref = call(plain, ref_x)
    (ref * w).sum().backward()
    got_x = x.clone().requires_grad_(True)
    out = call(sharded, got_x)
    ((out * w).sum() / world).backward()
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
    for grad in [got_x.grad, *grads.values()]:
        dist.all_reduce(grad)
    ref_grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys(), set(grads) ^ set(ref_grads)

    def err(a, b):
        scale = b.abs().max().clamp_min(1e-30) if relative else 1.0
        return ((a - b).abs().max() / scale).item()

    # Relative to the largest parameter gradient: a bias before a normalisation has a zero gradient
    # (1e-15 of rounding), which no per-parameter ratio can compare.
    largest = max(g.abs().max() for g in ref_grads.values()).clamp_min(1e-30) if relative else 1.0

    def param_error(got: dict) -> float:
        return max(((got[n] - ref_grads[n]).abs().max() / largest).item() for n in got)

    errors = {"output": err(out, ref), "hidden_states grad": err(got_x.grad, ref_x.grad),
              "parameter grads": param_error(grads)}
    return errors, param_error


def _ltx_worker(rank, world):
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    model = _ltx()
    plain = copy.deepcopy(model)
    x, text, t, mask, w = _inputs()
    sharded = parallelize(model, dist.group.WORLD, "n", layout="b n c", inputs=("hidden_states",), sizes=SIZES[world])

    def call(m, tokens):
        return m(tokens, text, t, mask, num_frames=FRAMES, height=HEIGHT, width=WIDTH, return_dict=False)[0]

    return _against_one_process(plain, sharded, model, call, x, w, world)[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ltx_video_transformer_is_exact_on_sharded_tokens(world):
    for errors in run_ranks(_ltx_worker, world, timeout=300):
        assert max(errors.values()) < 1e-10, errors


def _wan():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).double().eval()


WAN_SIZES = {1: [[5]], 2: [[3, 2]], 3: [[1, 4, 0]]}  # latent frames


def _wan_worker(rank, world):
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    model = _wan()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 4, 4, dtype=torch.float64, generator=g)
    text = torch.randn(2, 5, 12, dtype=torch.float64, generator=g)
    t = torch.tensor([500, 20])
    w = torch.randn(2, 4, 5, 4, 4, dtype=torch.float64, generator=g)
    # Wan computes parts of its blocks in float32: the one-process control's own floor is the change
    # in its parameter gradients when the same loss is summed in two backward passes (first frames, rest).
    control = copy.deepcopy(plain)
    for part in (slice(0, 2), slice(2, None)):
        (control(x, t, text, return_dict=False)[0][:, :, part] * w[:, :, part]).sum().backward()
    sharded = parallelize(model, dist.group.WORLD, "t", inputs=("hidden_states",), sizes=WAN_SIZES[world])
    errors, param_error = _against_one_process(
        plain, sharded, model, lambda m, latents: m(latents, t, text, return_dict=False)[0], x, w, world, relative=True)
    errors["control floor"] = param_error({n: p.grad for n, p in control.named_parameters() if p.grad is not None})
    return errors


@pytest.mark.parametrize("world", [1, 2, 3])
def test_wan_transformer_is_exact_on_sharded_frames(world):
    """Exact in float64 where Wan stays in float64 (the output, the input gradient); the parameter
    gradients within 20x the one-process control's own float32 floor."""
    for errors in run_ranks(_wan_worker, world, timeout=300):
        assert errors["output"] < 1e-10 and errors["hidden_states grad"] < 1e-10, errors
        assert 0 < errors["control floor"] < 1e-5, errors
        assert errors["parameter grads"] <= 20 * errors["control floor"], errors


def _hunyuan_worker(rank, world):
    """HunyuanVideo's joint text+video attention: the text tokens joined to the sharded video tokens
    (``cat``), masked attention over the joint sequence, the split back, frames unpatchified."""
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12,
        pooled_projection_dim=6, rope_axes_dim=(2, 2, 4), guidance_embeds=False).double().eval()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64, generator=g)
    text = torch.randn(2, 5, 12, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    pooled = torch.randn(2, 6, dtype=torch.float64, generator=g)
    t = torch.tensor([500, 20])
    w = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64, generator=g)
    sizes = {1: [[3]], 2: [[2, 1]], 3: [[1, 2, 0]]}[world]
    sharded = parallelize(model, dist.group.WORLD, "t", inputs=("hidden_states",), sizes=sizes)
    return _against_one_process(
        plain, sharded, model, lambda m, latents: m(latents, t, text, mask, pooled, return_dict=False)[0], x, w, world)[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_hunyuan_video_transformer_is_exact_on_sharded_frames(world):
    for errors in run_ranks(_hunyuan_worker, world, timeout=300):
        assert max(errors.values()) < 1e-10, errors



def _cogvideox_worker(rank, world):
    """CogVideoX: frames folded into the batch for the patch embedding (``(b t) c h w``: with b = 2 the
    shard moves from t to b, one all-to-all), text tokens joined in front of the video tokens."""
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=12,
        num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=5).double().eval()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64, generator=g)  # b t c h w latents
    text = torch.randn(2, 5, 12, dtype=torch.float64, generator=g)
    t = torch.tensor([500, 20])
    w = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64, generator=g)
    sizes = {1: [[3]], 2: [[2, 1]], 3: [[1, 2, 0]]}[world]
    sharded = parallelize(model, dist.group.WORLD, "t", layout="b t c h w", inputs=("hidden_states",), sizes=sizes)
    return _against_one_process(
        plain, sharded, model, lambda m, latents: m(latents, text, t, return_dict=False)[0], x, w, world)[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_cogvideox_transformer_is_exact_on_sharded_frames(world):
    for errors in run_ranks(_cogvideox_worker, world, timeout=300):
        assert max(errors.values()) < 1e-10, errors


# ----------------------------------------------------------------------------------------------
# Causal video VAEs: the encoder and the decoder of each, run whole over the frames (the models'
# own frame-batching loops with caches compute the same function in pieces; sharding replaces them).
# Wan's (2.1, and 2.2's residual form; QwenImage's is the same code) exists only as its loop: its
# temporal resampling runs only with the frame cache. It runs unchanged through its own ``encode`` and
# ``decode``: over h every rank works on every chunk; over t each chunk runs on the ranks holding its
# frames, in turn (exact, not parallel in time).


class _Encode(torch.nn.Module):
    """The VAE's own ``encode`` (its chunk loop and caches) as a module ``parallelize`` can hook."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x).latent_dist.mode()


class _Decode(_Encode):
    """The VAE's own ``decode``."""

    def forward(self, z):
        return self.vae.decode(z).sample


def _vae(name):
    torch.manual_seed(0)
    small = {"block_out_channels": (8, 8, 16, 16), "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4}
    if name == "cogvideox":
        model = diffusers.AutoencoderKLCogVideoX(**small)
    elif name == "hunyuan":
        model = diffusers.AutoencoderKLHunyuanVideo(**small)
    elif name == "allegro":
        model = diffusers.AutoencoderKLAllegro(**small)
    elif name == "magvit":  # EasyAnimate's
        model = diffusers.AutoencoderKLMagvit(**small)
    elif name == "hunyuan15":
        model = diffusers.AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 16, 16, 16),
                                                      layers_per_block=1)
    elif name == "cosmos":
        model = diffusers.AutoencoderKLCosmos(
            latent_channels=4, encoder_block_out_channels=(8, 8, 16, 16), decode_block_out_channels=(8, 8, 16, 16),
            attention_resolutions=(8,), resolution=32, num_layers=1, patch_size=2, temporal_compression_ratio=4)
    elif name == "ltx":
        model = diffusers.AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=1)
    elif name == "minimax":  # MiniMax-H3: a convolutional encoder, a ViT decoder with register and class tokens
        model = diffusers.AutoencoderKLMiniMaxH3(
            latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1, spatial_downsample_factors=(2, 2, 1),
            temporal_downsample_factors=(1, 2, 1), norm_num_groups=4, decoder_num_layers=1,
            decoder_num_attention_heads=2, decoder_attention_head_dim=16, decoder_num_register_tokens=2,
            latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    elif name == "ltx2":
        model = diffusers.AutoencoderKLLTX2Video(
            latent_channels=8, block_out_channels=(8, 16, 32, 64), decoder_block_out_channels=(8, 16, 32),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), patch_size=1)
    elif name == "vidtok":
        model = diffusers.AutoencoderVidTok(ch=8, ch_mult=[1, 2, 2], z_channels=4, num_res_blocks=1)
    elif name == "kvae":  # a streaming VAE: its cached causal convolutions write into torch.empty buffers
        model = diffusers.AutoencoderKLKVAEVideo(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4,
                                                 temporal_compress_times=4)
    elif name == "kandinsky6sr":  # Kandinsky 6's super-resolution VAE, the same buffer pattern
        model = diffusers.Kandinsky6SRVAE(
            latent_channels=4, encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
            layers_per_block=1, temporal_compression_ratio=4, temporal_compression_start_level=1)
    elif name in ("wan", "wan22"):
        residual = {"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2} if name == "wan22" else {}
        model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, **residual)
    else:  # mochi: its GroupNorm has 32 groups
        model = diffusers.AutoencoderKLMochi(
            encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4, latent_channels=4,
            layers_per_block=(1, 1, 1, 1, 1))
    return model.double().eval()


_VAE_INPUT = {  # (name, part) -> input shape (b, c, t, h, w)
    ("cogvideox", "encoder"): (1, 3, 9, 16, 16), ("cogvideox", "decoder"): (1, 4, 3, 4, 4),
    ("hunyuan", "encoder"): (1, 3, 9, 16, 16), ("hunyuan", "decoder"): (1, 4, 3, 4, 4),
    ("allegro", "encoder"): (1, 3, 8, 16, 16), ("allegro", "decoder"): (1, 4, 2, 4, 4),
    ("magvit", "encoder"): (1, 3, 9, 16, 16), ("magvit", "decoder"): (1, 4, 3, 4, 4),
    ("hunyuan15", "encoder"): (1, 3, 9, 32, 32), ("hunyuan15", "decoder"): (1, 4, 3, 4, 4),
    ("cosmos", "encoder"): (1, 3, 9, 16, 16), ("cosmos", "decoder"): (1, 4, 3, 4, 4),
    ("ltx", "encoder"): (1, 3, 9, 16, 16), ("ltx", "decoder"): (1, 8, 3, 4, 4),
    ("mochi", "encoder"): (1, 3, 12, 16, 16), ("mochi", "decoder"): (1, 4, 3, 4, 4),
    ("minimax", "encoder"): (1, 3, 9, 16, 16), ("minimax", "decoder"): (1, 4, 3, 4, 4),
    ("ltx2", "encoder"): (1, 3, 9, 16, 16), ("ltx2", "decoder"): (1, 8, 2, 2, 2),
    ("wan", "encoder"): (1, 3, 9, 16, 16), ("wan", "decoder"): (1, 4, 3, 4, 4),
    ("wan22", "encoder"): (1, 3, 9, 32, 32), ("wan22", "decoder"): (1, 4, 3, 4, 4),
    ("kvae", "encoder"): (1, 3, 9, 16, 16), ("kvae", "decoder"): (1, 4, 3, 4, 4),
    ("vidtok", "encoder"): (1, 3, 9, 16, 16), ("vidtok", "decoder"): (1, 4, 3, 4, 4),
    ("kandinsky6sr", "encoder"): (1, 3, 9, 16, 16), ("kandinsky6sr", "decoder"): (1, 4, 3, 4, 4),
}
_VAE_SIZES = {  # (length, world) -> shard lengths, uneven and empty
    (2, 2): [1, 1], (2, 3): [1, 1, 0], (3, 2): [2, 1], (3, 3): [1, 2, 0], (4, 2): [3, 1], (8, 2): [5, 3],
    (8, 3): [2, 6, 0], (9, 2): [5, 4], (9, 3): [2, 7, 0], (12, 2): [6, 6], (12, 3): [3, 9, 0], (16, 2): [10, 6],
    (32, 2): [20, 12],
}
# HunyuanVideo 1.5's encoder packs 2x2(x2) pixels into channels by ``view``, and Wan 2.2's averages pairs of
# frames and of pixels by ``view`` (AvgDown3D) at every level, within the frame chunks of its loop ([0],
# [1, 5), [5, 9)): off those grids the shards move onto them first (the view is then of that copy).


# diffusers' RMSNorm (LTX's VAE) computes its variance in float32 whatever the input dtype; with it in
# float64 (RMSNorm.forward patched, a one-off check on 2026-12-06) its sharded decoder matched to 5e-15.
# Wan upsamples in float32 (WanUpsample casts its input): its backward sums gradients in float32.
# Kandinsky 6's VAE normalises in float32 (Kandinsky6VAERMSNorm: F.normalize of x.float()); VidTok's
# decoder upsamples in float32 (F.interpolate(x.to(torch.float32), ...)).
_FLOAT32_INSIDE = {"ltx", "wan", "wan22", "kandinsky6sr", "vidtok"}


# Run through their own ``encode``/``decode``: Wan's temporal resampling exists only in its frame-cache
# loop; KVAE's and Kandinsky 6's layers take the cache dict their loops make.
_OWN_LOOP = {"wan", "wan22", "kvae", "kandinsky6sr"}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _vae_part(name, part):
    """A fresh instance of the VAE's encoder or decoder, its own loop where it needs one (``_OWN_LOOP``),
    the same weights each time (``_vae`` seeds): VidTok's weight-normed layers cannot be deep-copied."""
    vae = _vae(name)
    if name in _OWN_LOOP:
        return _Encode(vae) if part == "encoder" else _Decode(vae)
    return getattr(vae, part)


def _vae_worker(rank, world, name, part, axis):
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    module, plain = _vae_part(name, part), _vae_part(name, part)
    g = torch.Generator().manual_seed(1)
    shape = _VAE_INPUT[name, part]
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    ref_shape = _first(_vae_part(name, part)(x)).shape  # a fresh one: some VAEs keep state between calls (Magvit)
    w = torch.randn(ref_shape, dtype=torch.float64, generator=g)
    if axis == "t h":  # a 2 x 2 mesh, even splits
        from torch.distributed.device_mesh import init_device_mesh

        mesh, axes, sizes = init_device_mesh("cpu", (2, 2), mesh_dim_names=("t", "h")), ("t", "h"), None
    else:
        split = _VAE_SIZES[shape[2 if axis == "t" else 3], world]
        mesh, axes, sizes = dist.group.WORLD, axis, [split]
    sharded = parallelize(module, mesh, axes, sizes=sizes)
    errors, param_error = _against_one_process(
        plain, sharded, module, lambda m, v: _first(m(v)), x, w, world, relative=True)
    if name in _FLOAT32_INSIDE:
        # The one-process control's own floor: its change when its input is rounded to float32, the
        # rounding its float32 internals apply to their own inputs.
        control = _vae_part(name, part)
        rounded = x.float().double().requires_grad_(True)
        out = _first(control(rounded))
        (out * w).sum().backward()
        errors["control floor"] = max(
            ((out - _first(plain(x))).abs().max() / out.abs().max()).item(),
            param_error({n: p.grad for n, p in control.named_parameters() if p.grad is not None}))
    return errors


@pytest.mark.parametrize("axis,world", [("t", 2), ("t", 3), ("h", 2), ("t h", 4)])
@pytest.mark.parametrize("part", ["encoder", "decoder"])
@pytest.mark.parametrize("name", ["cogvideox", "hunyuan", "ltx", "mochi", "allegro", "magvit", "hunyuan15", "cosmos",
                                  "wan", "wan22", "ltx2", "minimax", "kvae", "kandinsky6sr", "vidtok"])
def test_video_vae_is_exact_on_sharded_frames(name, part, axis, world):
    """The output, the input gradient and every parameter gradient (relative to their largest value)
    within 1e-10, or within 20x the one-process control's floor where the model computes in float32."""
    for errors in run_ranks(_vae_worker, world, name, part, axis, timeout=300):
        floor = 1e-10
        if name in _FLOAT32_INSIDE:
            assert 0 < errors["control floor"] < 1e-5, errors
            floor = 20 * errors["control floor"]
        assert max(v for k, v in errors.items() if k != "control floor") <= floor, errors


# ----------------------------------------------------------------------------------------------
# More video transformers, each as its pipeline calls it (batch 2, 3 latent frames of 4x4 or 8x8):
# outputs and input gradients exact; parameter gradients exact, or within 20x the one-process
# control's own floor where the model computes in float32 (diffusers' RMSNorm variance, FP32LayerNorm,
# Wan-style float32 blocks): the change in its parameter gradients when the same loss is summed in two
# backward passes.


def _more(name: str, g):
    """(model, call(model, latents), latents, w) for ``name``, seeded alike on every rank."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64, generator=g)
    text = torch.randn(2, 5, 12, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    t = torch.tensor([500, 20])
    if name == "mochi":
        text = torch.randn(2, 5, 16, dtype=torch.float64, generator=g)  # its attention pooler has 8 heads
        model = diffusers.MochiTransformer3DModel(
            patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
            in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=5)
        with torch.no_grad():  # zero at init: its rotary embedding would be the identity
            model.pos_frequencies.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        call = lambda m, v: m(v, text, t, mask, return_dict=False)[0]  # noqa: E731
    elif name == "allegro":
        model = diffusers.AllegroTransformer3DModel(
            patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            num_layers=2, cross_attention_dim=16, sample_height=8, sample_width=8, sample_frames=3, caption_channels=12)
        call = lambda m, v: m(v, text, t, encoder_attention_mask=mask, return_dict=False)[0]  # noqa: E731
    elif name == "cosmos":
        model = diffusers.CosmosTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2.0,
            text_embed_dim=12, adaln_lora_dim=4, max_size=(8, 16, 16), patch_size=(1, 2, 2),
            concat_padding_mask=False, extra_pos_embed_type=None)
        call = lambda m, v: m(v, t.double(), text, return_dict=False)[0]  # noqa: E731
    elif name == "skyreels":
        model = diffusers.SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
        call = lambda m, v: m(v, t, text, return_dict=False)[0]  # noqa: E731
    elif name == "hunyuan15":
        x = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64, generator=g)
        text2 = torch.randn(2, 3, 8, dtype=torch.float64, generator=g)
        image = torch.randn(2, 2, 6, dtype=torch.float64, generator=g)
        model = diffusers.HunyuanVideo15Transformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12, text_embed_2_dim=8,
            image_embed_dim=6, rope_axes_dim=(2, 2, 4))
        mask2 = torch.tensor([[1, 1, 0], [1, 0, 0]])
        call = lambda m, v: m(v, t.double(), text, mask, encoder_hidden_states_2=text2,  # noqa: E731
                              encoder_attention_mask_2=mask2, image_embeds=image, return_dict=False)[0]
    elif name == "easyanimate":
        x = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64, generator=g)
        model = diffusers.EasyAnimateTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=8,
            sample_height=8, num_layers=2, mmdit_layers=1, time_embed_dim=8, text_embed_dim=12)
        call = lambda m, v: m(v, t, encoder_hidden_states=text, return_dict=False)[0]  # noqa: E731
    elif name == "motif":  # single blocks: text joined to the video, normalised, sliced back out as keys
        model = diffusers.MotifVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=12,
            rope_axes_dim=(2, 2, 4), num_decoder_layers=1, image_embed_dim=6,
            enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)
        # Its sinusoidal timestep projection is float32 and cast only for half dtypes: float64 here.
        model.time_text_embed.time_proj.register_forward_hook(lambda module, args, out: out.double())
        image = torch.randn(2, 2, 6, dtype=torch.float64, generator=g)
        call = lambda m, v: m(v, t, text, encoder_attention_mask=mask, image_embeds=image,  # noqa: E731
                              return_dict=False)[0]
    elif name == "sana_video":  # frames folded into the batch by a view with b = 2; float32 linear attention
        model = diffusers.SanaVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
            mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32)
        call = lambda m, v: m(v, text, t, encoder_attention_mask=mask, return_dict=False)[0]  # noqa: E731
    elif name == "sana_wm":  # flip along the frames, a shifted backward scan, camera-conditioned key norms
        x = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64, generator=g)
        model = diffusers.SanaWMTransformer3DModel(
            in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1),
            softmax_every_n=2, linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4, caption_channels=12,
            chunk_plucker_channels=6, chunk_plucker_post_attn_blocks=2, mlp_ratio=2.0, image_size=4)
        with torch.no_grad():  # zero at init: the camera (Plucker) path would be inert
            model.plucker_embedder.proj.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        frame_t = torch.tensor([[[0.0, 500.0, 500.0]], [[0.0, 20.0, 20.0]]], dtype=torch.float64)  # per frame
        c2w = torch.eye(4, dtype=torch.float64).repeat(2, 3, 1, 1)
        c2w[:, :, :3, 3] = torch.randn(2, 3, 3, dtype=torch.float64, generator=g) * 0.3
        angle = torch.randn(2, 3, dtype=torch.float64, generator=g) * 0.2
        c2w[:, :, 0, 0], c2w[:, :, 0, 2] = angle.cos(), angle.sin()
        c2w[:, :, 2, 0], c2w[:, :, 2, 2] = -angle.sin(), angle.cos()
        intrinsics = torch.tensor([4.0, 4.0, 2.0, 2.0], dtype=torch.float64).expand(2, 3, 4)
        camera = torch.cat([c2w.flatten(2), intrinsics], -1)
        plucker = torch.randn(2, 6, 3, 4, 4, dtype=torch.float64, generator=g)
        call = lambda m, v: m(v, frame_t, text[:, None], mask=mask, camera_conditions=camera,  # noqa: E731
                              chunk_plucker=plucker, return_dict=False)[0]
    else:  # latte: frames folded into the batch, cross-attention to the text repeated per frame
        x = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64, generator=g)
        model = diffusers.LatteTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
            cross_attention_dim=16, sample_size=4, patch_size=2, activation_fn="gelu-approximate",
            norm_type="ada_norm_single", caption_channels=12, video_length=3)
        call = lambda m, v: m(v, t, encoder_hidden_states=text, return_dict=False)[0]  # noqa: E731
    w = torch.randn(x.shape, dtype=torch.float64, generator=g)
    return model.double().eval(), call, x, w


def _more_worker(rank, world, name):
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    model, call, x, w = _more(name, torch.Generator().manual_seed(1))
    plain = copy.deepcopy(model)
    control = copy.deepcopy(plain)
    for part in (slice(0, 2), slice(2, None)):
        (call(control, x)[:, :, part] * w[:, :, part]).sum().backward()
    sizes = {1: [[3]], 2: [[2, 1]], 3: [[1, 2, 0]]}[world]
    sharded = parallelize(model, dist.group.WORLD, "t", inputs=("hidden_states",), sizes=sizes)
    errors, param_error = _against_one_process(plain, sharded, model, call, x, w, world, relative=True)
    errors["control floor"] = param_error({n: p.grad for n, p in control.named_parameters() if p.grad is not None})
    return errors


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["mochi", "allegro", "cosmos", "skyreels", "hunyuan15", "easyanimate", "latte", "motif",
                                  "sana_video", "sana_wm"])
def test_more_video_transformers_are_exact_on_sharded_frames(name, world):
    for errors in run_ranks(_more_worker, world, name, timeout=300):
        floor = max(1e-10, 20 * errors["control floor"])
        if name in ("sana_video", "sana_wm"):  # linear attention in float32: every figure within its floor
            assert 0 < errors["control floor"] < 1e-5, errors
            assert errors["output"] <= floor and errors["hidden_states grad"] <= floor, errors
        else:
            assert errors["output"] < 1e-10 and errors["hidden_states grad"] < 1e-10, errors
        assert errors["parameter grads"] <= floor, errors


def _ltx2_worker(rank, world):
    """LTX-2's audio and video streams: its audio tokens (whole on every rank) attend to the sharded
    video tokens (whole queries, sharded keys: gathered), the video to the audio (sharded queries,
    whole keys). Both outputs in the loss, the video's first, as one tensor."""
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=12).double().eval()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, text, t, mask, _ = _inputs()
    audio = torch.randn(2, 5, 4, dtype=torch.float64, generator=g)
    audio_text = torch.randn(2, 5, 12, dtype=torch.float64, generator=g)
    w = torch.randn(2, FRAMES * HEIGHT * WIDTH + 5, 4, dtype=torch.float64, generator=g)

    def call(m, tokens):
        video_out, audio_out = m(hidden_states=tokens, audio_hidden_states=audio, encoder_hidden_states=text,
                                 audio_encoder_hidden_states=audio_text, timestep=t, sigma=t,
                                 encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=FRAMES,
                                 height=HEIGHT, width=WIDTH, audio_num_frames=5, return_dict=False)
        return torch.cat([video_out, audio_out], 1)

    # LTX-2 computes its norms' statistics in float32: the one-process control's floor (module docstring of
    # the Wan test) is the change in the gradients when the same loss is summed in two backward passes.
    control, control_x = copy.deepcopy(plain), x.clone().requires_grad_(True)
    for part in (slice(0, 6), slice(6, None)):
        (call(control, control_x)[:, part] * w[:, part]).sum().backward()
    sharded = parallelize(model, dist.group.WORLD, "n", layout="b n c", inputs=("hidden_states",), sizes=SIZES[world])
    errors, param_error = _against_one_process(plain, sharded, model, call, x, w, world, relative=True)
    errors["control floor"] = param_error({n: p.grad for n, p in control.named_parameters() if p.grad is not None})
    ref_x = x.clone().requires_grad_(True)
    (call(copy.deepcopy(plain), ref_x) * w).sum().backward()
    errors["control input floor"] = ((control_x.grad - ref_x.grad).abs().max() / ref_x.grad.abs().max()).item()
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_ltx2_audio_and_video_streams_are_exact_on_sharded_video_tokens(world):
    """The output exact; the gradients within 20x the one-process control's own float32 floor."""
    for errors in run_ranks(_ltx2_worker, world, timeout=300):
        assert errors["output"] < 1e-10, errors
        floor = max(errors["control floor"], errors["control input floor"])
        assert 0 < floor < 1e-5, errors
        assert errors["hidden_states grad"] <= 20 * floor and errors["parameter grads"] <= 20 * floor, errors


def _ltx2_decoder_worker(rank, world):
    """LTX-2's diffusion decoder as its pipeline calls it (``decode``, which runs ``self.decoder``): its
    neighborhood attention is flex_attention with a BlockMask over the whole token grid."""
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = diffusers.LTX2VideoDiffusionDecoderModel(
        out_channels=3, latent_channels=8, patch_size=4, decoder_head_dim=16,
        decoder_stage_channels=(128, 64, 32, 32, 16), decoder_stage_depths=(1, 1, 1, 1, 1),
        decoder_stage_kernels=((3, 1, 1), (3, 1, 1), (3, 1, 1), (3, 3, 3)), decoder_stage5_kernel=(3, 3, 3),
        decoder_t_emb_dim=16).double()
    plain = copy.deepcopy(model)
    sizes = {2: [[2, 1]], 3: [[1, 0, 2]]}[world]
    parallelize(model.decoder, dist.group.WORLD, "t", inputs=("hidden_states",), sizes=sizes)
    z = torch.randn(2, 8, 3, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = (m.decode(z, generator=torch.Generator().manual_seed(7), return_dict=False)[0]
                     for m in (plain, model))
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("world", [2, 3])
def test_ltx2_diffusion_decoder_with_flex_attention_matches_one_process(world):
    """Forward only: torch's flex attention has no backward on CPU (for one process as for ours)."""
    for err in run_ranks(_ltx2_decoder_worker, world, timeout=300):
        assert err < 1e-14, err


def _kandinsky6_sr_worker(rank, world):
    """Kandinsky 6's SR transformer: its NABLA attention ranks each query block's key blocks from the
    sharded queries' scores (sort, an in-place cumsum, gather), builds a BlockMask from them with
    ``from_kv_blocks`` (the tables gathered whole) and runs flex_attention on it."""
    import torch.distributed as dist

    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    model = diffusers.Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=32, ff_dim=32,
        num_visual_blocks=2, axes_dims=(4, 6, 6), nabla_window=(3, 3, 3)).double()
    plain = copy.deepcopy(model)
    sizes = {2: [[2, 1]], 3: [[1, 2, 0]]}[world]
    parallelize(model, dist.group.WORLD, "t", layout="b t h w c", inputs=("hidden_states",), sizes=sizes)
    x = torch.randn(2, 3, 8, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(700.0, dtype=torch.float64).expand(2)
    with torch.no_grad():
        want, got = (m(hidden_states=x, timestep=t, return_dict=False)[0] for m in (plain, model))
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("world", [2, 3])
def test_kandinsky6_sr_transformer_with_a_nabla_block_mask_matches_one_process(world):
    """Forward only: torch's flex attention has no backward on CPU (for one process as for ours)."""
    for err in run_ranks(_kandinsky6_sr_worker, world, timeout=300):
        assert err < 1e-14, err
