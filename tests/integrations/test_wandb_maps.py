"""Attention-map logging: queries and drawing, the maps of a sequence-parallel C2D model equal the
single-process maps, and scripts/train.py --maps-every logging images (W&B offline) or finishing
with a clear message when wandb cannot be imported."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import rel_err
from nonlocal_dist.integrations.wandb_logger import RunLogger
from nonlocal_dist.integrations.wandb_maps import (
    KEY_COLOUR,
    QUERY_COLOUR,
    AttentionMapLogger,
    ink_queries,
    map_caption,
    render_maps,
    top_keys,
    viridis,
)

from nonlocal_dist.models import C2DNonLocal
from nonlocal_dist.sharded import distribute
from nonlocal_dist.testing import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[2]
GREEN = np.array([26, 255, 51], dtype=np.uint8)  # QUERY_COLOUR


def test_ink_queries_are_the_centres_of_the_inked_frames():
    clip = torch.zeros(1, 4, 16, 16)
    clip[0, 3, 2:5, 10:13] = 1.0  # centre (3, 11)
    clip[0, 1, 9:15, 0:4] = 0.5  # centre (11.5 -> 12, 1.5 -> 2), less ink
    clip[0, 0, 0, 0] = 0.1
    assert ink_queries(clip, 2) == [(1, 12, 2), (3, 3, 11)]
    assert ink_queries(torch.zeros(1, 2, 8, 8), 2) == [(0, 4, 4)]


def test_top_keys_are_the_largest_affinities_of_each_row():
    maps = np.random.default_rng(0).random((3, 4, 5, 6))
    for heat, found in zip(maps, top_keys(maps, count=4)):
        flat = torch.from_numpy(heat).flatten().topk(4)
        want = [(tuple(int(i) for i in np.unravel_index(k, heat.shape)), v) for k, v in zip(flat.indices.tolist(), flat.values.tolist())]
        assert found == want
        assert found[0][0] == tuple(int(i) for i in np.unravel_index(heat.argmax(), heat.shape))


def _drawn():
    frames = np.zeros((4, 16, 16))
    frames[0, 3:12, 6:9] = 1.0
    maps = np.full((2, 4, 8, 8), 0.01)  # key grid 4 x 8 x 8 (h, w sub-sampled by 2)
    maps[0, 3, 2, 5], maps[0, 1, 6, 6] = 0.08, 0.05  # query 0's strongest keys: frame 3, then frame 1
    maps[1, 0, 4, 3] = 0.05
    queries, grid = [(0, 5, 7), (3, 8, 8)], (4, 16, 16)
    keys = top_keys(maps, count=2)
    return render_maps(frames, maps, queries, grid, keys), keys, maps


def test_render_maps_colours_rings_the_top_keys_and_outlines_the_query():
    image, keys, maps = _drawn()
    tile, gap, header = 128, 4, 16  # 16 x 16 frames upscaled 8 x
    assert image.dtype == np.uint8 and image.shape == (header + 2 * (tile + gap), 4 * (tile + gap) + 14 + 60, 3)
    assert keys[0] == [((3, 2, 5), 0.08), ((1, 6, 6), 0.05)]

    def centre(row, key):  # the pixel at the centre of key cell (t, h, w) of the 4 x 8 x 8 key grid
        t, h, w = key
        return image[header + row * (tile + gap) + h * 16 + 8, t * (tile + gap) + w * 16 + 8]

    strongest = np.round(255 * 0.7 * viridis(np.array(1.0))).astype(int)
    weakest = np.round(255 * 0.7 * viridis(np.array(0.0))).astype(int)
    assert (np.abs(centre(0, (3, 2, 5)).astype(int) - strongest) <= 1).all()  # viridis yellow at the top key
    assert (np.abs(centre(0, (2, 0, 0)).astype(int) - weakest) <= 1).all()  # dark purple elsewhere
    red, green = [(np.array(c) * 255).round().astype(np.uint8) for c in (KEY_COLOUR, QUERY_COLOUR)]
    rows = [image[header + r * (tile + gap) : header + r * (tile + gap) + tile] for r in range(2)]
    frame = lambda r, t: rows[r][:, t * (tile + gap) : t * (tile + gap) + tile]
    ringed = [[(frame(r, t) == red).all(-1).any() for t in range(4)] for r in range(2)]
    assert ringed == [[t in {key[0] for key, _ in keys[r]} for t in range(4)] for r in range(2)], ringed
    assert ringed[0] == [False, True, False, True]
    outlined = [[(frame(r, t) == green).all(-1).any() for t in range(4)] for r in range(2)]
    assert outlined == [[True, False, False, False], [False, False, False, True]]  # the query's own frame only
    bar = image[header : header + tile, 4 * (tile + gap) + 7]
    assert (np.abs(bar[0].astype(int) - np.round(255 * viridis(np.array(1.0)))) <= 1).all()  # colour bar: max on top
    assert (np.abs(bar[-1].astype(int) - np.round(255 * viridis(np.array(0.0)))) <= 1).all()


def test_caption_names_block_step_queries_and_top_keys():
    _, keys, maps = _drawn()
    caption = map_caption("features.2", 40, [(0, 5, 7), (3, 8, 8)], (4, 16, 16), (4, 8, 8), keys)
    assert caption.startswith("features.2 at step 40:")
    assert "row 1: query (t, h, w) = (0, 5, 7) -> top keys (3, 2, 5) (0.08), (1, 6, 6) (0.05)" in caption
    assert "row 2: query (t, h, w) = (3, 8, 8) -> top keys (0, 4, 3) (0.05)" in caption
    assert "(4, 8, 8) key grid" in caption and "viridis" in caption


def _capture_case(rank, world):
    group = dist.group.WORLD
    torch.manual_seed(0)
    whole = C2DNonLocal(in_channels=1, widths=(8, 16, 16), nonlocal_after=(1, 2)).double()
    with torch.no_grad():  # BatchNorm weights of a new block are 0: give the maps something to show
        for p in whole.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    sharded = C2DNonLocal(in_channels=1, widths=(8, 16, 16), nonlocal_after=(1, 2), sp_group=group).double()
    sharded.load_state_dict(whole.state_dict())
    clip = torch.zeros(1, 1, 5, 16, 16, dtype=torch.float64)  # 5 frames: uneven shards
    clip[0, 0, 4, 8:14, 1:6] = torch.rand(6, 5, dtype=torch.float64)
    clip[0, 0, 1, 2:6, 9:15] = torch.rand(4, 6, dtype=torch.float64)
    off = RunLogger(rank=1, mode="disabled", project="", config={}, run_dir="")  # captures, logs nothing
    want = AttentionMapLogger(whole, off, 1, clip, whole).capture()
    got = AttentionMapLogger(sharded, off, 1, clip, lambda c: sharded(distribute(c, group, "b c t h w", "t"))).capture()
    failures = [] if sorted(got) == sorted(want) == ["features.2", "features.4"] else [f"blocks {sorted(got)}"]
    for name, (maps, cells, grid) in want.items():
        if got[name][1:] != (cells, grid) or got[name][0].shape != maps.shape or rel_err(torch.from_numpy(got[name][0]), torch.from_numpy(maps)) > 1e-12:
            failures.append(f"{name}: cells {got[name][1]} vs {cells}, grid {got[name][2]} vs {grid}")
    return failures, whole.training


@pytest.mark.parametrize("world", [2, 3])
def test_maps_of_sequence_parallel_model_equal_single_process_maps(world):
    for failures, training in run_ranks(_capture_case, world, timeout=120):
        assert not failures, failures
        assert training, "capture must leave the model in training mode"


def _train(tmp: Path, *args: str, torchrun: bool, prelude: str = "") -> subprocess.CompletedProcess:
    script = [str(ROOT / "scripts/train.py"), "--deepspeed_config", str(ROOT / "configs/ds_zero2.json"),
              "--run-dir", str(tmp), "--ckpt-dir", str(tmp / "ckpt"), "--train-clips", "64", "--test-clips", "16",
              "--quiet", "--steps", "2", "--maps-every", "1", *args]
    env = dict(os.environ, WANDB_SILENT="true", OMP_NUM_THREADS="1")
    if torchrun:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *script]
    else:  # one process, as a launcher would set it up; `prelude` runs before train.py
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        run = f"import runpy, sys; sys.argv = {script!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
        cmd = [sys.executable, "-c", f"{prelude}\n{run}"]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_logs_map_images_and_rank_table_offline(tmp_path):
    from PIL import Image

    _train(tmp_path, "--sp-size", "2", "--wandb", "offline", torchrun=True)
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    images = sorted(glob.glob(f"{run}/files/media/images/attention_maps/*.png"))
    assert len(images) == 4, images  # 2 blocks x 2 steps
    for path in images:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape == (16 + 2 * 132, 4 * 132 + 74, 3), pixels.shape  # 2 queries x 4 frames of 16 x 16, 8 x: 128 px
        assert (pixels == GREEN).all(-1).any(), f"{path}: no query outline"
    blob = Path(glob.glob(f"{run}/run-*.wandb")[0]).read_bytes()
    for key in (b"attention_maps/features.2", b"attention_maps/features.4", b"perf/ranks"):
        assert key in blob, key
    (table,) = glob.glob(f"{run}/files/media/table/perf/ranks_*.table.json")
    table = json.loads(Path(table).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["rank"], r["sp_rank"]) for r in rows] == [(0, 0), (1, 1)]
    assert all(r["clips_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)


def test_train_without_wandb_finishes_with_a_message(tmp_path):
    proc = _train(tmp_path, "--wandb", "offline", torchrun=False, prelude="import sys; sys.modules['wandb'] = None")
    assert proc.stdout.count("wandb is not installed") == 1, proc.stdout
    result = json.loads((tmp_path / "nonlocal-sp1-zero2.json").read_text())
    assert result["finished"] and len(result["history"]) == 2 and result["wandb_dir"] is None
    assert not (tmp_path / "wandb").exists()


def test_without_pillow_images_are_off_said_once_and_metrics_go_on(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL.Image` raises ImportError
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    logger = RunLogger(0, "offline", "nonlocal_dist-tests", {}, str(tmp_path))
    try:
        model = C2DNonLocal(in_channels=1, widths=(4, 4), nonlocal_after=(1,))
        maps = AttentionMapLogger(model, logger, 1, torch.rand(1, 1, 2, 8, 8), model)
        maps.maybe_log(1, 1)
        logger.log({"train/loss": 0.5}, 1)
    finally:
        where = logger.finish()
    assert capsys.readouterr().out.count("pillow is not installed") == 1
    assert not maps.enabled and maps.seconds == 0.0
    # RunLogger.finish returns once the run file is on disk (before the fix: often only its header).
    assert b"train/loss" in Path(glob.glob(f"{where}/run-*.wandb")[0]).read_bytes()
    assert not glob.glob(f"{where}/files/media/images/**/*.png", recursive=True)
