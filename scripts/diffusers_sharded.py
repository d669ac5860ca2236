"""A diffusers video transformer and its causal VAE, sequence-parallel over the latent frames, unchanged.

One denoising step of HunyuanVideo's transformer, then the VAE decode, on every rank of a process
group: ``parallelize`` shards the latents' frames (the text, its mask, the pooled text and the
timestep stay whole on every rank), the VAE decoder runs on each rank's frames, and every rank ends
with the whole video. Checked against the same models in one process (small configs, random
weights, float64 by default).

    torchrun --nproc_per_node 2 scripts/diffusers_sharded.py [--frames 5] [--size 8] [--dtype float32]
    python scripts/diffusers_sharded.py        # one process: the sharded path on a group of one

Needs ``pip install -e .[diffusers]``.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist

from nonlocal_dist import parallelize
from nonlocal_dist.testing import free_port


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=5, help="latent frames (4 T - 3 video frames)")
    p.add_argument("--size", type=int, default=8, help="latent height and width (8x in pixels)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    return p.parse_args(argv)


def build(dtype):
    import diffusers

    torch.manual_seed(0)  # the same weights on every rank (parallelize checks them)
    dit = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12,
        pooled_projection_dim=6, rope_axes_dim=(2, 2, 4), guidance_embeds=False)
    vae = diffusers.AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 16, 16), latent_channels=4,
                                              layers_per_block=1, norm_num_groups=4)
    return dit.to(dtype).eval(), vae.to(dtype).eval()


def generate(dit, vae, latents, text, mask, pooled, timestep):
    """One Euler step of the flow-matching sampler, then the decode (the VAE's own post-quant conv first)."""
    velocity = dit(latents, timestep, text, mask, pooled, return_dict=False)[0]
    latents = latents - 0.5 * velocity
    return vae.decoder(vae.post_quant_conv(latents))


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    dit, vae = build(dtype)
    plain_dit, plain_vae = copy.deepcopy(dit), copy.deepcopy(vae)

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, args.frames, args.size, args.size, dtype=dtype, generator=g)
    text = torch.randn(1, 5, 12, dtype=dtype, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    pooled = torch.randn(1, 6, dtype=dtype, generator=g)
    timestep = torch.tensor([500])

    # The sequence-parallel versions: the latent frames split over the group, everything else whole.
    group = dist.group.WORLD
    sharded_dit = parallelize(dit, group, "t", inputs=("hidden_states",))
    parallelize(vae.decoder, group, "t")  # hooks on the decoder in place: vae.decoder is now sequence-parallel

    with torch.no_grad():
        video = generate(sharded_dit, vae, latents, text, mask, pooled, timestep)
        reference = generate(plain_dit, plain_vae, latents, text, mask, pooled, timestep)
    error = (video - reference).abs().max().item()
    if rank == 0:
        print(f"{world} rank(s), {args.dtype}: video {tuple(video.shape)}, max abs difference from one process {error:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
