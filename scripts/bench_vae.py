"""Sharded causal-VAE decoding (issue 25) against one process and diffusers' tiled decoding, in one run.

HunyuanVideo's VAE (diffusers, a small config, random weights, float32 or float64), latents (1, 4, T, S, S):

- **one process**: ``vae.decode`` whole (temporal and spatial tiling off): the reference;
- **diffusers tiled**: ``vae.enable_tiling`` with spatial tiles of 64 pixels (stride 48), then also
  temporal tiles of 16 frames (stride 12, diffusers' default), blended where they overlap: the usual
  way to fit a decode in memory;
- **ours**: ``parallelize(vae.decoder)`` on P gloo ranks (1 thread each), the latent frames split over
  the ranks, each rank keeping its own output frames (``output="local"``); the one 1x1x1
  ``post_quant_conv`` runs before it on every rank.

Columns: the max abs error against the reference (ours gathered), wall time of the decode (the
slowest rank for ours; one process and tiled run with 1 thread too), and two peaks of the memory
held during the decode beyond what was held before, per rank, each with its ratio to one process:
the bytes malloc holds, read after every op (``bench_utils.peak_heap_mb``: every thread's,
gloo's buffers included; it misses a kernel's workspace freed inside its op), and torch's CPU
allocator's events (``bench_utils.peak_memory_mb``: workspaces included, an upper bound where gloo's
threads free buffers).

    python scripts/bench_vae.py [--world 4] [--frames 17] [--size 16] [--dtype float32]
"""
from __future__ import annotations

import argparse
import time

import torch
from bench_utils import peak_heap_mb, peak_memory_mb, print_table, spawn_ranks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4, help="ranks P")
    p.add_argument("--frames", type=int, default=17, help="latent frames T (4T - 3 video frames)")
    p.add_argument("--size", type=int, default=16, help="latent height and width S (8S pixels)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    return p.parse_args(argv)


def _vae(args):
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(block_out_channels=(16, 32, 32, 32), latent_channels=4,
                                              layers_per_block=1, norm_num_groups=8).to(getattr(torch, args.dtype)).eval()
    vae.use_framewise_decoding = False  # the reference decodes whole
    return vae


def _latents(args) -> torch.Tensor:
    return torch.randn(1, 4, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(1),
                       dtype=getattr(torch, args.dtype))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _one_process(args, tiled: str = "") -> dict:
    torch.set_num_threads(1)
    vae, z = _vae(args), _latents(args)
    if tiled:
        vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                          tile_sample_stride_width=48, tile_sample_min_num_frames=16, tile_sample_stride_num_frames=12)
        vae.use_framewise_decoding = tiled == "space and time"
    with torch.no_grad():
        out, seconds = _timed(lambda: vae.decode(z).sample)
        peak, heap = peak_memory_mb(lambda: vae.decode(z)), peak_heap_mb(lambda: vae.decode(z))
    return {"out": out, "seconds": seconds, "peak_mb": peak, "heap_mb": heap}


def _sharded(rank, world, args, group) -> dict:
    from nonlocal_dist import parallelize
    from nonlocal_dist.distributed.collectives import gather_dim

    vae, z = _vae(args), _latents(args)
    decoder = parallelize(vae.decoder, group, "t", output="local")
    with torch.no_grad():
        zq = vae.post_quant_conv(z)
        local, seconds = _timed(lambda: decoder(zq))
        peak, heap = peak_memory_mb(lambda: decoder(zq)), peak_heap_mb(lambda: decoder(zq))
        sizes = [0] * world
        torch.distributed.all_gather_object(sizes, local.shape[2], group=group)
        whole = gather_dim(local, 2, sizes, group)
    return {"out": whole, "seconds": seconds, "peak_mb": peak, "heap_mb": heap}


def main(argv=None) -> None:
    args = parse_args(argv)
    ref = _one_process(args)
    tiled = {kind: _one_process(args, kind) for kind in ("space", "space and time")}
    ranks = spawn_ranks(_sharded, args.world, args)
    ours = {"out": ranks[0]["out"], "seconds": max(r["seconds"] for r in ranks.values()),
            "peak_mb": max(r["peak_mb"] for r in ranks.values()), "heap_mb": max(r["heap_mb"] for r in ranks.values())}
    scale = ref["out"].abs().max().item()
    rows = []
    for name, r in (("one process (reference)", ref), ("diffusers tiled in space", tiled["space"]),
                    ("diffusers tiled in space and time", tiled["space and time"]), (f"ours, P = {args.world}", ours)):
        err = (r["out"] - ref["out"]).abs().max().item()
        rows.append([name, err, err / scale, r["seconds"], r["heap_mb"], r["heap_mb"] / ref["heap_mb"], r["peak_mb"],
                     r["peak_mb"] / ref["peak_mb"]])
    shape = tuple(ref["out"].shape)
    print_table(f"HunyuanVideo VAE decode, latents (1, 4, {args.frames}, {args.size}, {args.size}) -> video {shape}, "
                f"{args.dtype}, 1 thread per process",
                ["decode", "max abs err", "relative", "time (s)", "heap peak MiB per rank", "x one process",
                 "allocator peak MiB per rank", "x one process"], rows)


if __name__ == "__main__":
    main()
