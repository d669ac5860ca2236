"""Per-shard video decoding (``nonlocal_dist.video``), measured in one process, ratios in one run:

- decode time per rank for one H.264 clip (default 256 frames, 224x224, a keyframe every 32 frames)
  when each of P = 4 ranks decodes its own time shard, against one rank decoding the whole clip
  (the frame index is rebuilt on every read: a cold read, demuxing included);
- memory per rank for the decoded clip (uint8 bytes) at P = 4 against P = 1;
- loader throughput (clips/s) of ``VideoClipDataset`` through a DataLoader with 2 workers against
  the same clips decoded in a plain loop (interleaved, the best of ``--repeats // 2`` runs of each).

    python scripts/benchmark.py --suite decode [--frames 256]   # or: python scripts/bench_decode.py [...]
    python scripts/bench_decode.py [--frames 256] [--size 224] [--keyint 32] [--world 4] [--clips 96]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nonlocal_dist.video import (
    ClipTransform,
    EvalBatchSampler,
    VideoClipDataset,
    clip_loader,
    collate_clips,
    read_clip,
)
from nonlocal_dist.video.decode import clear_index_cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=256, help="frames of the test clip")
    p.add_argument("--size", type=int, default=224, help="frame height and width")
    p.add_argument("--keyint", type=int, default=32, help="keyframe interval of the H.264 encoding (frames)")
    p.add_argument("--world", type=int, default=4, help="ranks P of the sequence-parallel group")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (best taken)")
    p.add_argument("--clips", type=int, default=96, help="clips read by the loader comparison")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    return p.parse_args(argv)


def write_clip(path: Path, frames: int, size: int, keyint: int) -> None:
    """A moving, textured H.264 clip (yuv420p, crf 23, B-frames, closed GOPs of ``keyint`` frames)."""
    import av

    yy, xx = np.mgrid[0:size, 0:size]
    noise = np.random.default_rng(0).integers(0, 40, (size, size, 3))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.max_b_frames = 3
        stream.options = {"crf": "23", "preset": "veryfast",
                          "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=3"}
        for t in range(frames):
            base = np.stack([(xx + 2 * t) % 256, (yy + t) % 256, (xx + yy + 3 * t) % 256], axis=-1)
            frame = av.VideoFrame.from_ndarray(((base + noise) % 256).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def cold_read(path: Path, frames: int, shard) -> tuple[float, torch.Tensor]:
    clear_index_cache()  # a cold read: demux for the frame index too
    start = time.perf_counter()
    clip = read_clip(path, 0, frames, shard=shard)
    return time.perf_counter() - start, clip


def decode_rows(args, path: Path) -> list[tuple[str, str]]:
    shards = [None] + [(rank, args.world) for rank in range(args.world)]
    best = {shard: float("inf") for shard in shards}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows every configuration alike
        for shard in shards:
            best[shard] = min(best[shard], cold_read(path, args.frames, shard)[0])
    one, times = best[None], [best[shard] for shard in shards[1:]]
    full = cold_read(path, args.frames, None)[1]
    sizes = [cold_read(path, args.frames, shard)[1] for shard in shards[1:]]
    sizes = [clip.numel() * clip.element_size() for clip in sizes]
    full_bytes = full.numel() * full.element_size()
    slowest = max(times)
    return [
        ("decode time per rank, P=1 (ms)", f"{1e3 * one:.1f}"),
        (f"decode time per rank, P={args.world} (ms; max / mean over ranks)", f"{1e3 * slowest:.1f} / {1e3 * np.mean(times):.1f}"),
        (f"decode time ratio P={args.world} / P=1 (slowest rank)", f"{slowest / one:.3f}"),
        ("decoded clip per rank, P=1 (MiB)", f"{full_bytes / 2**20:.1f}"),
        (f"decoded clip per rank, P={args.world} (MiB, largest shard)", f"{max(sizes) / 2**20:.1f}"),
        (f"memory ratio P={args.world} / P=1", f"{max(sizes) / full_bytes:.3f}"),
    ]


def loader_rows(args, path: Path) -> list[tuple[str, str]]:
    ann = path.parent / "clips.txt"
    ann.write_text("".join(f"{path.name} {i % 2}\n" for i in range(args.clips)))
    dataset = VideoClipDataset(ann, path.parent, clip_len=32, frame_interval=2, shard=(1, args.world),
                               transform=ClipTransform(short_side=128, crop_size=112, flip_ratio=0.5))
    batches = EvalBatchSampler(args.clips, 4)

    def plain() -> float:
        clear_index_cache()
        start = time.perf_counter()
        for keys in batches:
            collate_clips([dataset[key] for key in keys])
        return args.clips / (time.perf_counter() - start)

    def loader() -> float:
        clear_index_cache()
        start = time.perf_counter()  # worker start-up included
        for _ in clip_loader(dataset, batches, args.workers):
            pass
        return args.clips / (time.perf_counter() - start)

    best_plain = best_loader = 0.0
    for _ in range(max(args.repeats // 2, 1)):  # interleaved, best of each
        best_plain, best_loader = max(best_plain, plain()), max(best_loader, loader())
    return [
        ("plain loop (clips/s)", f"{best_plain:.1f}"),
        (f"DataLoader, {args.workers} workers (clips/s, start-up included)", f"{best_loader:.1f}"),
        ("loader / plain loop", f"{best_loader / best_plain:.2f}"),
    ]


def main(argv=None) -> list[tuple[str, str]]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        write_clip(path, args.frames, args.size, args.keyint)
        rows = decode_rows(args, path) + loader_rows(args, path)
    load = os.getloadavg()[0]
    print(f"\n{args.frames}-frame {args.size}x{args.size} H.264 clip (yuv420p, crf 23, B-frames), keyframe every "
          f"{args.keyint} frames; 1 decoder thread; loader: clip_len 32, frame_interval 2, shard 1 of "
          f"{args.world}, resize 128, crop 112, {args.clips} clips; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return rows


if __name__ == "__main__":
    main()
