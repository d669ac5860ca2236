"""Apply non-local blocks of every mode to a video-shaped tensor and report what they did."""
from __future__ import annotations

import argparse
import time

import torch

from nonlocal_dist import NonLocalBlock
from nonlocal_dist.backends import select_backend
from nonlocal_dist.validate import check_op_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=5, default=[2, 64, 8, 28, 28], help="B C T H W")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(*args.shape)
    b, c, t, h, w = args.shape
    print(f"input video (B, C, T, H, W) = {tuple(x.shape)}: {t * h * w} spacetime positions per clip")
    for mode in ("gaussian", "embedded_gaussian", "dot_product", "concatenation"):
        for axes in ("t h w", "h w", "t"):
            block = NonLocalBlock(c, mode=mode, axes=axes, sub_sample={"h": 2, "w": 2} if "h" in axes else None)
            nn_init = (block(x) - x).abs().max().item()
            torch.nn.init.ones_(block.norm.weight)  # leave the identity initialisation to show the operation
            theta, phi, g = block.embed(block.layout.to_positions(x))
            backend = select_backend(check_op_inputs(theta, phi, g, mode, block.scale, block.concat_weight, "auto")[0])
            start = time.perf_counter()
            z = block(x)
            z.float().sum().backward()
            elapsed = time.perf_counter() - start
            print(
                f"{mode:18s} axes={axes!r:8s} N={theta.shape[2]:6d} M={phi.shape[2]:5d} backend={backend.name:7s} "
                f"identity at init: |z-x|max={nn_init:.1e}  trained-style fwd+bwd {elapsed * 1e3:7.1f} ms  "
                f"|z-x|mean={(z - x).abs().mean().item():.3f}"
            )


if __name__ == "__main__":
    main()
