"""Attention maps of a model's non-local blocks, logged to W&B as images (the paper's Figure 1).

Every ``every`` steps the model runs once more on one fixed clip, in eval mode and without
gradients (the training graph, BatchNorm statistics and optimizer are untouched); a forward
pre-hook on each ``NonLocalBlock`` takes its input and computes the affinity rows of a few query
points (``nonlocal_dist.attention_maps.affinity_rows``: Q rows, never the N×M matrix,
sequence-parallel like the block). Rank 0 draws, per block, one row of the clip's frames per query
(upscaled to >= 128 px) under the affinity in viridis (mean over heads, min-max scaled per query,
with a colour bar labelled by the row's min and max), the query's cell outlined in green and its
top-weighted keys ringed in red, as the paper's Figure 1 marks them; the caption names block,
step, queries and top keys with their weights.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from nonlocal_dist.attention_maps import affinity_rows, query_grid
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


# viridis (perceptually uniform, readable in grey and by colour-blind readers) at 11 of its 256 steps.
_VIRIDIS_AT = np.array([0, 32, 64, 96, 128, 160, 192, 208, 224, 240, 255]) / 255
_VIRIDIS = np.array([
    (0.267004, 0.004874, 0.329415), (0.282327, 0.140926, 0.457517), (0.253935, 0.265254, 0.529983),
    (0.206756, 0.371758, 0.553117), (0.163625, 0.471133, 0.558148), (0.127568, 0.566949, 0.550556),
    (0.134692, 0.658636, 0.517649), (0.266941, 0.748751, 0.440573), (0.477504, 0.821444, 0.318195),
    (0.741388, 0.873449, 0.149561), (0.993248, 0.906157, 0.143936),
])
QUERY_COLOUR = (0.1, 1.0, 0.2)  # green square: the query's cell
KEY_COLOUR = (1.0, 0.15, 0.15)  # red rings: the top-weighted keys


def viridis(v: np.ndarray) -> np.ndarray:
    """Colours (..., 3) in [0, 1] of values v in [0, 1] (dark purple -> blue -> green -> yellow)."""
    return np.stack([np.interp(v, _VIRIDIS_AT, _VIRIDIS[:, i]) for i in range(3)], axis=-1)


def top_keys(maps: np.ndarray, count: int = 3) -> list[list[tuple[Pixel, float]]]:
    """Per query, the ``count`` largest affinities of maps (Q, T', h', w'): [((t, h, w) of the key grid, weight)]."""
    out = []
    for heat in maps:
        order = np.argsort(heat, axis=None, kind="stable")[::-1][:count]
        out.append([(tuple(int(i) for i in np.unravel_index(k, heat.shape)), float(heat.flat[k])) for k in order])
    return out


def render_maps(frames: np.ndarray, maps: np.ndarray, queries: list[Pixel], grid: tuple[int, ...],
                keys: list[list[tuple[Pixel, float]]], tile: int = 128, gap: int = 4) -> np.ndarray:
    """An RGB uint8 image: one row per query, the T frames side by side under the affinity in viridis.

    frames (T, H, W) in [0, 1]; maps (Q, T', h', w') affinities over the key grid (nearest-upsampled
    to the frames, min-max scaled per query, each row with its colour bar labelled by its min and
    max); queries: Q cells (t, h, w) of the query ``grid`` (T, h_q, w_q), outlined in green; keys:
    per query the key-grid cells to ring in red (``top_keys``). Frames are upscaled to at least
    ``tile`` pixels on their longer side; a header names the frames.
    """
    from PIL import Image, ImageDraw  # the wandb extra's pillow: images are off without it

    t_count, height, width = frames.shape
    zoom = max(1, -(-tile // max(height, width)))
    tile_h, tile_w, header, bar = height * zoom, width * zoom, 16, 14
    label = 8 * 7 + 4
    index = [np.arange(n) * m // n for n, m in zip(frames.shape, maps.shape[1:])]
    image = np.ones((header + len(queries) * (tile_h + gap), t_count * (tile_w + gap) + bar + label, 3))
    for row, (heat, cell, row_keys) in enumerate(zip(maps, queries, keys)):
        low, high = float(heat.min()), float(heat.max())
        # Min-max per query: an untrained block's rows are near uniform; contrast shows their structure.
        scaled = (heat[np.ix_(*index)] - low) / max(high - low, 1e-30)  # (T, H, W)
        top = header + row * (tile_h + gap)
        for t in range(t_count):
            tile_rgb = 0.7 * viridis(scaled[t]) + 0.3 * frames[t][..., None]  # the digits show through
            tile_rgb = tile_rgb.repeat(zoom, 0).repeat(zoom, 1)
            if t == cell[0] * t_count // grid[0]:
                _outline(tile_rgb, cell[1:], grid[1:], (height, width), zoom)
            for key, _ in row_keys:
                if index[0][t] == key[0]:
                    _ring(tile_rgb, key[1:], maps.shape[2:], (height, width), zoom)
            left = t * (tile_w + gap)
            image[top : top + tile_h, left : left + tile_w] = tile_rgb
        left = t_count * (tile_w + gap)
        image[top : top + tile_h, left : left + bar] = viridis(np.linspace(1, 0, tile_h))[:, None]
    picture = Image.fromarray((image * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for t in range(t_count):
        draw.text((t * (tile_w + gap) + 2, 2), f"t = {t}", fill=(0, 0, 0))
    for row, (heat, row_keys) in enumerate(zip(maps, keys)):
        top, left = header + row * (tile_h + gap), t_count * (tile_w + gap) + bar + 3
        draw.text((left, top), f"{float(heat.max()):.3g}", fill=(0, 0, 0))
        draw.text((left, top + tile_h - 12), f"{float(heat.min()):.3g}", fill=(0, 0, 0))
        for rank, (key, _) in enumerate(row_keys, 1):  # the ring's rank, beside it (as the caption lists them)
            cy, cx = [(c + 0.5) * s * zoom / g for c, g, s in zip(key[1:], maps.shape[2:], (height, width))]
            for t in np.flatnonzero(index[0] == key[0]):
                draw.text((t * (tile_w + gap) + cx + zoom + 2, top + cy - zoom - 10), str(rank), fill=(255, 40, 40))
    return np.asarray(picture)


def map_caption(name: str, step: int, queries: list[Pixel], grid: tuple[int, ...], key_grid: tuple[int, ...],
                keys: list[list[tuple[Pixel, float]]]) -> str:
    """What the image shows: block, step, each query cell and its top-weighted key cells with their weights."""
    rows = "; ".join(
        f"row {i + 1}: query (t, h, w) = {query} -> top keys "
        + ", ".join(f"{key} ({weight:.3g})" for key, weight in row_keys)
        for i, (query, row_keys) in enumerate(zip(queries, keys))
    )
    return (f"{name} at step {step}: affinity of each query (green square, a cell of the {grid} query grid) to "
            f"every key (viridis, mean over heads, per row from its min to its max: the colour bar); red rings: "
            f"the top keys, cells of the {key_grid} key grid. {rows}")


def _outline(tile: np.ndarray, cell: tuple[int, int], grid: tuple[int, int], size: tuple[int, int], zoom: int) -> None:
    """A 2-pixel square around query cell (h, w), at least 8 pixels wide, on a zoomed frame tile."""
    (y0, y1), (x0, x1) = [(c * s * zoom // g, max((c + 1) * s * zoom // g, c * s * zoom // g + 8))
                          for c, g, s in zip(cell, grid, size)]
    tile[y0:y1, [x0, x0 + 1, x1 - 2, x1 - 1]] = QUERY_COLOUR
    tile[[y0, y0 + 1, y1 - 2, y1 - 1], x0:x1] = QUERY_COLOUR


def _ring(tile: np.ndarray, cell: tuple[int, int], grid: tuple[int, ...], size: tuple[int, int], zoom: int) -> None:
    """A ring around the centre of key-grid cell (h, w) on a zoomed frame tile."""
    cy, cx = [(c + 0.5) * s * zoom / g for c, g, s in zip(cell, grid, size)]
    radius = max(0.35 * min(s * zoom / g for g, s in zip(grid, size)), 4.0)
    yy, xx = np.ogrid[: tile.shape[0], : tile.shape[1]]
    distance = np.sqrt((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2)
    tile[np.abs(distance - radius) <= 1.0] = KEY_COLOUR


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
                keys = top_keys(maps)
                caption = map_caption(name, step, cells, grid, tuple(maps.shape[1:]), keys)
                images[f"attention_maps/{name}"] = (render_maps(frames, maps, cells, grid, keys), caption)
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
                rows = affinity_rows(block, x, cells)  # (B', H, Q, *key grid)
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
