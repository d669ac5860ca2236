"""Attention maps of a model's non-local blocks, logged to W&B as images (the paper's Figure 1).

Every ``every`` steps the model runs once more on one fixed clip, in eval mode and without
gradients (the training graph, BatchNorm statistics and optimizer are untouched); a forward
pre-hook on each ``NonLocalBlock`` takes its input and computes the affinity rows of a few query
points (``NonLocalBlock.affinity_rows``: Q rows, never the N×M matrix, sequence-parallel like the
block). Rank 0 draws, per block, one row of the clip's frames per query with the affinity as a
heat map (mean over heads, min-max scaled per query: the strongest key white, the weakest black)
and the query's cell outlined in green.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from nonlocal_dist.attention_maps import query_grid
from nonlocal_dist.block import NonLocalBlock
from nonlocal_dist.integrations.wandb_logger import RunLogger

Pixel = tuple[int, int, int]


def ink_queries(clip: Tensor, count: int = 2) -> list[Pixel]:
    """(t, y, x) pixels of a clip (C, T, H, W): the centre of mass of the ``count`` frames with most ink."""
    ink = clip.detach().abs().sum(0).double()  # (T, H, W)
    mass = ink.sum((1, 2))
    frames = sorted(int(t) for t in mass.argsort(descending=True)[:count] if mass[t] > 0)
    if not frames:
        return [(0, ink.shape[1] // 2, ink.shape[2] // 2)]
    ys, xs = torch.arange(ink.shape[1], dtype=torch.float64), torch.arange(ink.shape[2], dtype=torch.float64)
    centres = [((ink[t].sum(1) @ ys).item() / mass[t].item(), (ink[t].sum(0) @ xs).item() / mass[t].item()) for t in frames]
    return [(t, int(y + 0.5), int(x + 0.5)) for t, (y, x) in zip(frames, centres)]


def _cells(points: list[Pixel], clip_sizes: tuple[int, ...], grid: tuple[int, ...]) -> list[Pixel]:
    """Pixels -> the block's grid cells that contain them (grid sizes per axis, same axis order)."""
    return [tuple(min(p * g // s, g - 1) for p, g, s in zip(point, grid, clip_sizes)) for point in points]


def _hot(v: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white colours (..., 3) for values in [0, 1]."""
    return np.clip(np.stack([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0.0, 1.0)


def render_maps(frames: np.ndarray, maps: np.ndarray, queries: list[Pixel], grid: tuple[int, ...],
                zoom: int = 6, gap: int = 2) -> np.ndarray:
    """An RGB uint8 image: one row per query, the T frames side by side, each with its heat map.

    frames (T, H, W) in [0, 1]; maps (Q, T', h', w') affinities over the key grid (nearest-upsampled
    to the frames, min-max scaled per query); queries: Q cells (t, h, w) of the query ``grid``
    (T, h_q, w_q), outlined in green.
    """
    t_count, height, width = frames.shape
    index = [np.arange(n) * m // n for n, m in zip(frames.shape, maps.shape[1:])]
    tile_h, tile_w = height * zoom, width * zoom
    image = np.ones((len(queries) * (tile_h + gap) - gap, t_count * (tile_w + gap) - gap, 3))
    for row, (heat, cell) in enumerate(zip(maps, queries)):
        heat = heat[np.ix_(*index)]  # (T, H, W)
        # Min-max per query: an untrained block's rows are near uniform; contrast shows their structure.
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-30)
        for t in range(t_count):
            tile = 0.45 * frames[t][..., None] + 0.55 * _hot(heat[t])
            tile = tile.repeat(zoom, 0).repeat(zoom, 1)
            if t == cell[0] * t_count // grid[0]:
                _outline(tile, cell[1:], grid[1:], (height, width), zoom)
            top, left = row * (tile_h + gap), t * (tile_w + gap)
            image[top : top + tile_h, left : left + tile_w] = tile
    return (image * 255).round().astype(np.uint8)


def _outline(tile: np.ndarray, cell: tuple[int, int], grid: tuple[int, int], size: tuple[int, int], zoom: int) -> None:
    (y0, y1), (x0, x1) = [(c * s * zoom // g, max((c + 1) * s * zoom // g, c * s * zoom // g + 2))
                          for c, g, s in zip(cell, grid, size)]
    green = (0.1, 1.0, 0.2)
    tile[y0:y1, [x0, x1 - 1]] = green
    tile[[y0, y1 - 1], x0:x1] = green


class AttentionMapLogger:
    """Logs the maps of every spacetime ``NonLocalBlock`` (axes t, h, w) of ``model`` every ``every`` steps.

    ``clip`` (1, C, T, H, W): the full clip on every rank; ``forward(clip)`` runs the model on it as
    training does (sharding it under SP). All ranks construct it and call ``maybe_log`` at the same
    steps (the maps forward has collectives); whether maps are on is rank 0's decision, broadcast.
    """

    def __init__(self, model: nn.Module, logger: RunLogger, every: int, clip: Tensor, forward: Callable[[Tensor], Tensor],
                 queries: int = 2) -> None:
        self.model, self.logger, self.every, self.clip, self.forward = model, logger, every, clip, forward
        self.blocks = [(name.removeprefix("module."), m) for name, m in model.named_modules()
                       if isinstance(m, NonLocalBlock) and m.layout.axes == ("t", "h", "w")]
        self.points = ink_queries(clip[0], queries)
        self.seconds = 0.0
        wanted = every > 0 and bool(self.blocks)
        on = [wanted and logger.images]
        if dist.is_initialized():
            dist.broadcast_object_list(on, src=0)  # (objects: works on gloo and NCCL alike)
        self.enabled = bool(on[0])
        if logger.run is not None and every > 0 and not self.blocks:
            print("attention maps: the model has no non-local blocks, nothing to draw")

    def maybe_log(self, step: int, global_samples: int) -> None:
        """Draw and log the maps when ``step`` is a multiple of ``every`` (no-op when disabled)."""
        if not self.enabled or step % self.every:
            return
        start = time.perf_counter()
        captured = self.capture()
        if self.logger.run is not None:
            frames = self.clip[0].float().abs().sum(0).numpy()
            frames = frames / max(float(frames.max()), 1e-12)
            images = {}
            for name, (maps, cells, grid) in captured.items():
                caption = (f"{name} at step {step}: query cells (t, h, w) {cells} of the grid {grid}, one row each; "
                           "heat = affinity to every key (mean over heads; per row, weakest black to strongest white)")
                images[f"attention_maps/{name}"] = (render_maps(frames, maps, cells, grid), caption)
            self.logger.log_images(images, global_samples)
        self.seconds += time.perf_counter() - start

    def capture(self) -> dict[str, tuple[np.ndarray, list[Pixel], tuple[int, ...]]]:
        """{block name: (maps (Q, *key grid) of the clip, query cells, query grid)} from one eval forward."""
        captured = {}
        clip_sizes = tuple(self.clip.shape[2:])

        def hook_for(name: str):
            def hook(block: NonLocalBlock, args) -> None:
                x = args[0]
                grid = tuple(query_grid(block, x).values())
                cells = _cells(self.points, clip_sizes, grid)
                rows = block.affinity_rows(x, cells)  # (B', H, Q, *key grid)
                captured[name] = (rows[0].mean(0).cpu().numpy(), cells, grid)
            return hook

        handles = [block.register_forward_pre_hook(hook_for(name)) for name, block in self.blocks]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.forward(self.clip)
        finally:
            self.model.train(was_training)
            for handle in handles:
                handle.remove()
        return captured
