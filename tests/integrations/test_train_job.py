"""The main job (scripts/train.py) under real launchers: a short SP=2 ZeRO-2 run logged to W&B
offline, preemption + --resume giving exactly the losses of an uninterrupted run, training from
video files giving the losses of training from memory, and the I3D model sharded over time by
``parallelize``."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nonlocal_dist.testing import free_port

pytest.importorskip("deepspeed")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--train-clips", "96", "--test-clips", "32", "--quiet"]


def _launch(tmp: Path, *args: str, launcher: str = "torchrun", config: str = "ds_zero2.json", sp: tuple = ("--sp-size", "2"),
            timeout: int = 300) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    else:
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(ROOT / "scripts/train.py"), "--deepspeed_config", str(ROOT / "configs" / config), *sp,
            "--run-dir", str(tmp), *SMALL, *args]
    env = dict(os.environ, WANDB_SILENT="true", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _result(tmp: Path, name: str = "nonlocal-sp2-zero2") -> dict:
    return json.loads((tmp / f"{name}.json").read_text())


def test_short_run_logs_to_wandb_offline(tmp_path):
    proc = _launch(tmp_path, "--steps", "4", "--ckpt-dir", str(tmp_path / "ckpt"), "--wandb", "offline")
    result = _result(tmp_path)
    assert result["finished"] and len(result["history"]) == 4
    assert "held-out acc" in proc.stdout
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    # The run file holds protobuf records: the metric names and the logged values appear verbatim.
    blob = Path(runs[0]).read_bytes()
    for key in (b"train/loss", b"perf/samples_per_s", b"eval/test_accuracy", b"global_samples", b"deepspeed"):
        assert key in blob, key
    assert json.dumps(result["test_accuracy"]).encode() in blob


def test_preempt_and_resume_matches_uninterrupted_run(tmp_path):
    """With a warmup + cosine learning-rate schedule, so the resumed run must also take up the schedule."""
    full, split = tmp_path / "full", tmp_path / "split"
    full.mkdir(), split.mkdir()
    exp = json.loads((ROOT / "configs/experiment.json").read_text())
    exp["train"]["warmup_fraction"] = 1 / 3  # steps 1-2 warm up, 3-6 decay
    (tmp_path / "exp.json").write_text(json.dumps(exp))
    common = ["--steps", "6", "--ckpt-every", "3", "--wandb", "disabled", "--experiment", str(tmp_path / "exp.json")]
    _launch(full, *common, "--ckpt-dir", str(full / "ckpt"))
    _launch(split, *common, "--ckpt-dir", str(split / "ckpt"), "--stop-after", "3", launcher="deepspeed")
    assert not _result(split)["finished"]
    _launch(split, *common, "--ckpt-dir", str(split / "ckpt"), "--resume")
    uninterrupted = [h["loss"] for h in _result(full)["history"]]
    resumed = _result(split)["history"]
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert [h["loss"] for h in resumed] == uninterrupted[3:]
    rates = [h["lr"] for h in _result(full)["history"]]
    peak = rates.index(max(rates))  # the schedule ran: up, then down
    assert 0 < peak < 5 and rates[: peak + 1] == sorted(rates[: peak + 1]) and rates[-1] < rates[peak], rates
    assert [h["lr"] for h in resumed] == rates[3:]
    assert _result(split)["test_accuracy"] == _result(full)["test_accuracy"]


def test_training_from_video_files_matches_memory(tmp_path):
    """--videos: the clips written as FFV1 files and read back per rank (each rank decoding its time shard,
    a DataLoader worker, later epochs from the decoded-shard cache) train exactly as the clips in memory."""
    pytest.importorskip("av")
    memory, files = tmp_path / "memory", tmp_path / "files"
    memory.mkdir(), files.mkdir()
    common = ["--steps", "4", "--wandb", "disabled"]  # 96 clips, 32 a step: step 4 starts the second epoch
    _launch(memory, *common, "--ckpt-dir", str(memory / "ckpt"))
    _launch(files, *common, "--ckpt-dir", str(files / "ckpt"), "--videos", str(tmp_path / "videos"),
            "--video-cache-mb", "4")
    assert (tmp_path / "videos" / "c2d" / "train.txt").is_file()
    assert len(list((tmp_path / "videos" / "c2d" / "train").glob("*.mkv"))) == 96
    from_files = _result(files)
    assert from_files["skipped_clips"] == 0
    assert [h["loss"] for h in from_files["history"]] == [h["loss"] for h in _result(memory)["history"]]
    assert from_files["test_accuracy"] == _result(memory)["test_accuracy"]


@pytest.mark.parametrize("config", ["ds_sp2.json", "ds_bf16.json"])
def test_shipped_configs_train(tmp_path, config):
    """ds_sp2.json sets SP = 2 through ``sequence_parallel_size`` alone; ds_bf16.json trains in bf16 with SP = 2."""
    sp = () if config == "ds_sp2.json" else ("--sp-size", "2")
    _launch(tmp_path, "--steps", "2", "--ckpt-dir", str(tmp_path / "ckpt"), "--wandb", "disabled", config=config, sp=sp)
    result = _result(tmp_path)
    assert result["finished"] and len(result["history"]) == 2
    assert all(h["loss"] == h["loss"] and h["loss"] > 0 for h in result["history"])


def test_i3d_sharded_over_time_trains(tmp_path):
    """--model i3d: the single-device I3D, sharded over time (SP = 2) by parallelize, its non-local
    blocks checkpointed, trains and evaluates on 16-frame clips."""
    proc = _launch(tmp_path, "--model", "i3d", "--steps", "3", "--ckpt-dir", str(tmp_path / "ckpt"),
                   "--wandb", "disabled", "--activation-checkpoint", "torch")
    result = _result(tmp_path, "i3d-nonlocal-sp2-zero2")
    assert result["finished"] and [h["step"] for h in result["history"]] == [1, 2, 3]
    assert all(0 < h["loss"] < 10 for h in result["history"])
    assert 0 <= result["test_accuracy"] <= 1 and "| i3d-nonlocal-sp2-zero2 | 3 |" in proc.stdout
