"""Small test videos, written once per session: lossless (exact frames) and lossy H.264 with B-frames,
keyframes every 8 frames so that shards seek across them."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")

FRAMES, SIZE, KEYINT = 40, 32, 8
X264_KEYINT = f"keyint={KEYINT}:min-keyint={KEYINT}:scenecut=0"


def source_frames(n: int = FRAMES, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """(n, H, W, 3) uint8, every frame different (a random walk, so inter-frame coding has work to do)."""
    rng = np.random.default_rng(0)
    return (np.cumsum(rng.integers(0, 9, (n, height, width, 3)), axis=0) % 256).astype(np.uint8)


def write_video(path, frames: np.ndarray, codec: str = "libx264rgb", pix_fmt: str = "rgb24", options=None,
                rate: int = 25, bframes: int = 0, pts=None, container_options=None) -> str:
    """Encode (T, H, W, 3) uint8 ``frames``; ``pts`` in milliseconds for a variable frame rate."""
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = dict(options or {})
        stream.codec_context.max_b_frames = bframes
        if codec == "ffv1":
            stream.codec_context.gop_size = KEYINT
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = int(pts[t]), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


@pytest.fixture(scope="session")
def frames() -> np.ndarray:
    return source_frames()


@pytest.fixture(scope="session")
def videos(tmp_path_factory, frames) -> dict[str, str]:
    """name -> path. Lossless: x264rgb.mp4, ffv1.mkv, vfr.mkv (irregular timestamps); lossy: bframes.mp4
    (H.264 yuv420p with B-frames); short.mp4 (5 frames); faststart.mp4 (header first)."""
    d = tmp_path_factory.mktemp("videos")
    lossless = {"crf": "0", "x264-params": X264_KEYINT}
    intervals = np.random.default_rng(1).choice([20, 40, 60], FRAMES)
    return {
        "x264rgb.mp4": write_video(d / "x264rgb.mp4", frames, options=lossless),
        "ffv1.mkv": write_video(d / "ffv1.mkv", frames, codec="ffv1", pix_fmt="bgr0"),
        "vfr.mkv": write_video(d / "vfr.mkv", frames, options=lossless, pts=np.cumsum(intervals) - intervals[0]),
        "bframes.mp4": write_video(d / "bframes.mp4", frames, codec="libx264", pix_fmt="yuv420p", bframes=3,
                                   options={"crf": "20", "x264-params": X264_KEYINT + ":bframes=3"}),
        "short.mp4": write_video(d / "short.mp4", frames[:5], options=lossless),
        "faststart.mp4": write_video(d / "faststart.mp4", frames, options=lossless,
                                     container_options={"movflags": "faststart"}),
    }
