"""Failing loudly and safely in distributed training: process-group timeouts, checkpoints that are
never half-written and load without executing code, non-finite guards, and fault injection to test them.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
EXIT_FAILED = 3


def resolve_timeout(seconds: float | None) -> timedelta:
    """``seconds`` if given, else DeepSpeed's ``DEEPSPEED_TIMEOUT`` (minutes), else 10 minutes."""
    if seconds is None:
        minutes = os.environ.get("DEEPSPEED_TIMEOUT")
        seconds = float(minutes) * 60 if minutes else DEFAULT_TIMEOUT_S
    if not seconds > 0:
        raise ValueError(f"the process-group timeout must be positive seconds, got {seconds}")
    return timedelta(seconds=seconds)


def apply_group_timeout(timeout: timedelta) -> None:
    """Give every process group created from now on ``timeout`` (call after init_process_group).

    torch gives ``new_group`` its own default (30 min for gloo), not the world group's, and the SP
    groups and DeepSpeed's internal groups are created without a timeout: this sets that default.
    """
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if not hasattr(c10d, name):
            raise RuntimeError(f"torch {torch.__version__} has no distributed_c10d.{name}: cannot set group timeouts")
        setattr(c10d, name, timeout)


@dataclass(frozen=True)
class Fault:
    """An injected fault, ``KIND:RANK:STEP``, to exercise the failure paths for real.

    ``kill``: SIGKILL mid-step (after the forward); ``hang``: sleep mid-step, forever; ``kill-in-save``:
    SIGKILL after every rank wrote the step's checkpoint, before it is committed; ``nan``: NaN in the input;
    ``nan-loss``: a NaN loss after a finite forward.
    """

    kind: str
    rank: int
    step: int

    KINDS = ("kill", "hang", "kill-in-save", "nan", "nan-loss")

    @classmethod
    def parse(cls, spec: str | None) -> Fault | None:
        if spec is None:
            return None
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] not in cls.KINDS or not (parts[1].isdigit() and parts[2].isdigit()):
            raise ValueError(f"--fault expects KIND:RANK:STEP with KIND in {cls.KINDS}, e.g. kill:1:5; got {spec!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]))

    def fire(self, kind: str, rank: int, step: int) -> bool:
        """Kill or hang this process if the fault is due here; True for a ``nan`` that is due."""
        if (self.kind, self.rank, self.step) != (kind, rank, step):
            return False
        print(f"[fault injection] {kind} on rank {rank} at step {step}", file=sys.stderr, flush=True)
        if kind in ("kill", "kill-in-save"):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(3600)
        return True


class StepGuard:
    """Turns any failure inside the training loop into one clear message and a non-zero exit.

    A rank that dies or hangs makes the others' next collective fail (a closed connection at once, or
    the process-group timeout); rather than a traceback from deep inside gloo/NCCL and a teardown that
    may itself hang on the broken group, each rank prints what happened, at which step, and where the
    last good checkpoint is, then exits with ``EXIT_FAILED``.
    """

    def __init__(self, rank: int, timeout: timedelta, ckpt_dir: str):
        self.rank, self.timeout, self.ckpt_dir = rank, timeout, ckpt_dir
        self.step = 0

    def __enter__(self) -> StepGuard:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or not isinstance(err, Exception):
            return False
        latest = latest_checkpoint(self.ckpt_dir)
        resume = f"the last good checkpoint is {latest}; rerun with --resume" if latest else "no checkpoint was written yet"
        if isinstance(err, NonFiniteError):
            cause = str(err)
        elif _is_collective_failure(err):
            cause = (f"lost contact with another rank (it died, or hung longer than the {self.timeout.total_seconds():g} s "
                     f"process-group timeout, --timeout / DEEPSPEED_TIMEOUT): {_first_line(err)}")
        else:
            cause = "".join(traceback.format_exception(kind, err, tb)).rstrip()
        print(f"rank {self.rank}: training stopped at step {self.step}: {cause}\nrank {self.rank}: {resume}",
              file=sys.stderr, flush=True)
        os._exit(EXIT_FAILED)


def _is_collective_failure(err: Exception) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class NonFiniteError(RuntimeError):
    """A non-finite input or loss; the message names the step and the ranks."""


def nonfinite_ranks(**tensors: torch.Tensor) -> dict[str, list[int]]:
    """For each named tensor, the ranks whose copy holds a NaN or an infinity (one all-reduce, world x k flags).

    Every rank gets the same answer, so every rank takes the same decision (raise or skip) and none hangs.
    """
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(dist.get_world_size(), len(tensors), device=device)
    flags[dist.get_rank()] = torch.tensor([float(not bool(torch.isfinite(t).all())) for t in tensors.values()])
    dist.all_reduce(flags)
    return {name: flags[:, k].nonzero().flatten().tolist() for k, name in enumerate(tensors)}


def check_finite(step: int, skip: bool, **tensors: torch.Tensor) -> bool:
    """True when every rank's tensors are finite; False (skip the step) or NonFiniteError otherwise."""
    bad = {name: ranks for name, ranks in nonfinite_ranks(**tensors).items() if ranks}
    if not bad:
        return True
    what = "; ".join(f"non-finite {name} on rank(s) {ranks}" for name, ranks in bad.items())
    if skip:
        if dist.get_rank() == 0:
            print(f"step {step}: {what}: step skipped (--skip-nonfinite)", file=sys.stderr, flush=True)
        return False
    raise NonFiniteError(f"{what} at step {step} (pass --skip-nonfinite to skip such steps instead)")


class SkipCounter:
    """Counts consecutive skipped steps; more than ``limit`` in a row stops the run (NonFiniteError):
    then the model itself has most likely gone non-finite, and skipping would only waste the budget."""

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"--max-skips must be >= 0, got {limit}")
        self.limit, self.in_a_row = limit, 0

    def record(self, step: int, skipped: bool) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row > self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} consecutive steps skipped up to step {step} (more than --max-skips {self.limit}): "
                "the model is likely non-finite; resume from an earlier checkpoint with a lower learning rate"
            )


# ----------------------------------------------------------------------------- checkpoints

LATEST = "latest"


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The committed checkpoint ``latest`` names, or None."""
    path = Path(ckpt_dir) / LATEST
    return str(Path(ckpt_dir) / path.read_text().strip()) if path.is_file() else None


def begin_fresh(ckpt_dir: str) -> int:
    """Start of a run without --resume: an earlier run's ``latest`` is removed (its checkpoints stay),
    so that this run never names, or resumes from, another run's checkpoint. Returns the first step, 0."""
    latest = Path(ckpt_dir) / LATEST
    if dist.get_rank() == 0 and latest.is_file():
        print(f"{ckpt_dir}: starting afresh (no --resume): removing the earlier run's '{LATEST}' "
              f"({latest.read_text().strip()}); its checkpoint folders stay", file=sys.stderr, flush=True)
        latest.unlink()
    dist.barrier()
    return 0


def save_checkpoint(engine, ckpt_dir: str, tag: str, client_state: dict, fault: Fault | None = None, step: int = 0) -> None:
    """DeepSpeed checkpoint ``ckpt_dir/tag``, committed only once every rank has written its files.

    Every rank writes into ``ckpt_dir/.partial-tag``; ``save_checkpoint`` returns after a barrier, so
    all files are complete; then rank 0 renames the folder to ``tag`` and replaces ``latest`` with
    a fully written file (DeepSpeed alone writes ``latest`` on rank 0 before the other ranks are
    known to be done). A crash at any point leaves ``latest`` on the previous good checkpoint.
    Like DeepSpeed's own ``latest``, this assumes ``ckpt_dir`` is one folder shared by all nodes.
    """
    root, staging = Path(ckpt_dir), f".partial-{tag}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / staging, ignore_errors=True)  # left by an earlier crash
    dist.barrier()
    engine.save_checkpoint(str(root), tag=staging, client_state=client_state, save_latest=False)
    if fault is not None:
        fault.fire("kill-in-save", rank, step)
    dist.barrier()
    if rank == 0:
        if (root / tag).exists():  # the same step of an earlier run
            shutil.rmtree(root / tag)
        os.replace(root / staging, root / tag)
        partial = root / f".{LATEST}.{os.getpid()}"
        partial.write_text(tag)
        with open(partial) as f:
            os.fsync(f.fileno())
        os.replace(partial, root / LATEST)
    dist.barrier()


def _deepspeed_state_classes() -> list:
    """The plain data classes DeepSpeed pickles into its checkpoints (loss-scaler state, the ZeRO stage,
    fragment addresses): allowed to be rebuilt from their fields; anything else is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint(engine, ckpt_dir: str) -> dict:
    """Load the committed checkpoint into ``engine`` with ``torch.load(weights_only=True)``: tensors,
    containers and plain values only, never code from the file. Returns the client state."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_state_classes()):
                return torch.load(path, map_location=map_location, weights_only=True)

    if latest_checkpoint(ckpt_dir) is None:
        raise FileNotFoundError(f"--resume: no committed checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    saving_engine = engine.checkpoint_engine
    if type(saving_engine) is not TorchCheckpointEngine:
        raise ValueError(f"weights-only resume reads files written by DeepSpeed's default TorchCheckpointEngine; this "
                         f"config uses {type(saving_engine).__name__}: remove its 'checkpoint' writer settings")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
    try:
        path, state = engine.load_checkpoint(ckpt_dir)
    finally:
        engine.checkpoint_engine = saving_engine  # later saves go through DeepSpeed's own engine, unchanged
    if path is None:
        raise FileNotFoundError(f"--resume: DeepSpeed found no checkpoint in {ckpt_dir}")
    return state
