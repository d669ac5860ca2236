"""Faults in a 2-rank run of scripts/train.py, started like srun starts tasks (one process per rank, no
launcher to clean up after a death): a rank killed mid-step or mid-checkpoint, a rank that hangs, a
non-finite input. The survivor must stop with a clear message within the process-group timeout, the
last committed checkpoint must load (weights only) and --resume must finish the run with the losses of
an uninterrupted one."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nonlocal_dist.testing import free_port

pytest.importorskip("deepspeed")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["--steps", "6", "--ckpt-every", "2"]
ARGS = ["--deepspeed_config", str(ROOT / "configs/ds_zero2.json"), "--sp-size", "2", "--run-dir", ".", "--ckpt-dir", "ckpt",
        "--train-clips", "96", "--test-clips", "32", "--quiet", "--wandb", "disabled", *STEPS]
RESULT = "nonlocal-sp2-zero2.json"
EXIT_FAILED = 3  # integrations.faults.EXIT_FAILED


def _start(tmp: Path, *extra: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """Both ranks as separate processes with the variables srun + slurm_task.sh would give them."""
    port, procs, logs = free_port(), [], []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", WANDB_SILENT="true")
        logs.append(tmp / f"rank{rank}.log")
        with logs[-1].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, "-u", str(ROOT / "scripts/train.py"), *ARGS, *extra],
                                          cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes after at most ``timeout`` seconds (None: still running, then killed)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    codes = [proc.poll() for proc in procs]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return codes


def _run(tmp: Path, *extra: str, timeout: float = 240) -> list[str]:
    procs, logs = _start(tmp, *extra)
    codes = _wait(procs, timeout)
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(f"--- rank {r}: {c}\n{o[-3000:]}" for r, (c, o) in enumerate(zip(codes, outputs)))
    return outputs


def _losses(tmp: Path) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in json.loads((tmp / RESULT).read_text())["history"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[tuple[int, float]]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _run(tmp)
    losses = _losses(tmp)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    return losses


@pytest.mark.parametrize("fault, last_good", [("kill:1:5", "step4"), ("kill-in-save:1:4", "step2")])
def test_killed_rank_stops_survivor_and_resume_finishes(tmp_path, uninterrupted, fault, last_good):
    timeout = 30
    procs, logs = _start(tmp_path, "--fault", fault, "--timeout", str(timeout))
    started = time.monotonic()
    procs[1].wait(timeout=240)
    died = time.monotonic()
    codes = _wait(procs, timeout + 20)
    survivor = logs[0].read_text()
    assert codes[1] == -signal.SIGKILL, logs[1].read_text()[-3000:]
    assert codes[0] == EXIT_FAILED, survivor[-3000:]
    assert time.monotonic() - died < timeout + 20, "the survivor outlived the process-group timeout"
    step = fault.rsplit(":", 1)[1]
    assert f"rank 0: training stopped at step {step}: lost contact with another rank" in survivor, survivor[-3000:]
    assert f"the last good checkpoint is ckpt/{last_good}; rerun with --resume" in survivor
    # Nothing half-written is visible: 'latest' names a complete checkpoint, which loads as weights only.
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == last_good
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == sorted(
        {"step2", last_good}
    )
    model = torch.load(ckpt / last_good / "mp_rank_00_model_states.pt", weights_only=True)
    assert model["step"] == int(last_good[4:]) and all(torch.isfinite(v).all() for v in model["module"].values())
    assert time.monotonic() - started < 300

    _run(tmp_path, "--resume")
    resumed = _losses(tmp_path)
    assert resumed == uninterrupted[int(last_good[4:]):]


def test_hung_rank_stops_survivor_within_timeout(tmp_path):
    timeout = 15
    procs, logs = _start(tmp_path, "--fault", "hang:1:3", "--timeout", str(timeout))
    codes = _wait([procs[0]], 240)
    hung = procs[1].poll() is None
    _wait([procs[1]], 0)
    survivor = logs[0].read_text()
    assert hung and "[fault injection] hang on rank 1 at step 3" in logs[1].read_text()
    assert codes == [EXIT_FAILED], survivor[-3000:]
    assert "rank 0: training stopped at step 3: lost contact with another rank" in survivor, survivor[-3000:]
    assert f"longer than the {timeout} s process-group timeout" in survivor
    # It waited for the timeout, not less (a hung peer is only detectable by it), and not much more.
    fault_at = (tmp_path / "rank1.log").stat().st_mtime
    assert timeout - 3 <= (tmp_path / "rank0.log").stat().st_mtime - fault_at <= timeout + 30


def test_nonfinite_input_stops_every_rank_naming_step_and_rank(tmp_path):
    procs, logs = _start(tmp_path, "--fault", "nan:1:3")
    codes = _wait(procs, 240)
    outputs = [log.read_text() for log in logs]
    assert codes == [EXIT_FAILED, EXIT_FAILED], outputs[0][-3000:] + outputs[1][-3000:]
    for rank, out in enumerate(outputs):
        assert (f"rank {rank}: training stopped at step 3: non-finite input on rank(s) [1] at step 3 "
                "(pass --skip-nonfinite to skip such steps instead)") in out, out[-3000:]


def test_skip_nonfinite_skips_the_step_exactly(tmp_path, uninterrupted):
    """--skip-nonfinite: step 3 is left out and the run finishes. A NaN loss comes after a forward that
    updated BatchNorm's running statistics; skipping must put them back, so that both kinds of skip give
    exactly the same later losses (a NaN input is caught before any forward)."""
    runs = {}
    for fault, what in (("nan:1:3", "input"), ("nan-loss:1:3", "loss")):
        tmp = tmp_path / what
        tmp.mkdir()
        outputs = _run(tmp, "--fault", fault, "--skip-nonfinite")
        result = json.loads((tmp / RESULT).read_text())
        assert result["finished"] and result["skipped_steps"] == [3]
        losses = _losses(tmp)
        assert [s for s, _ in losses] == [1, 2, 4, 5, 6] and losses[:2] == uninterrupted[:2]
        assert f"step 3: non-finite {what} on rank(s) [1]: step skipped (--skip-nonfinite)" in outputs[0]
        # Training-mode BatchNorm uses batch statistics; the running ones show in the eval-mode numbers.
        runs[what] = (losses, result["test_loss"], result["train_loss"], result["test_accuracy"])
    assert runs["input"] == runs["loss"]


def test_resume_refuses_code_in_a_checkpoint(tmp_path):
    """weights_only loading: a checkpoint that would run code when unpickled is rejected, not executed."""
    ckpt = tmp_path / "ckpt" / "step2"
    ckpt.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("step2")
    marker = tmp_path / "executed"
    with open(ckpt / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump(_RunsCode(str(marker)), f)
    procs, logs = _start(tmp_path, "--resume")
    codes = _wait(procs, 240)
    out = logs[0].read_text()
    assert codes == [EXIT_FAILED, EXIT_FAILED] and not marker.exists(), out[-3000:]
    assert "Weights only load failed" in out or "UnpicklingError" in out, out[-3000:]


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))
