"""The parts of integrations/faults.py on their own: timeouts reaching groups created later, the
non-finite vote every rank agrees on, argument parsing."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from nonlocal_dist.testing import run_ranks
from nonlocal_dist.integrations.faults import (
    Fault, NonFiniteError, SkipCounter, apply_group_timeout, begin_fresh, check_finite, nonfinite_ranks, resolve_timeout,
)


def _silent_peer_on_new_group(rank, world):
    """Rank 0 waits on a group created after apply_group_timeout(2 s); rank 1 never joins the collective."""
    apply_group_timeout(timedelta(seconds=2))
    group = dist.new_group([0, 1])
    if rank == 1:
        time.sleep(8)
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError as err:
        return time.monotonic() - start, str(err)
    return time.monotonic() - start, "no error"


def test_group_timeout_applies_to_groups_created_later():
    waited, error = run_ranks(_silent_peer_on_new_group, 2, timeout=60)[0]
    assert error != "no error"
    assert 1.5 <= waited < 7, (waited, error)  # the world group's 60 s (or gloo's 30 min) would be far longer


def _vote(rank, world):
    x = torch.ones(3)
    if rank == 1:
        x[1] = float("nan")
    loss = torch.tensor(float("inf") if rank == 2 else 1.0)
    ranks = nonfinite_ranks(input=x, loss=loss)
    try:
        check_finite(7, False, input=x, loss=loss)
        raised = None
    except RuntimeError as err:
        raised = str(err)
    return ranks, raised, check_finite(7, True, input=x), check_finite(7, False, input=torch.ones(2))


def test_nonfinite_vote_is_the_same_on_every_rank():
    results = run_ranks(_vote, 3)
    for ranks, raised, skip, fine in results:
        assert ranks == {"input": [1], "loss": [2]}
        assert raised == ("non-finite input on rank(s) [1]; non-finite loss on rank(s) [2] at step 7 "
                          "(pass --skip-nonfinite to skip such steps instead)")
        assert skip is False and fine is True


def test_timeout_from_argument_or_deepspeed_variable(monkeypatch):
    monkeypatch.delenv("DEEPSPEED_TIMEOUT", raising=False)
    assert resolve_timeout(None) == timedelta(seconds=600)
    assert resolve_timeout(12.5) == timedelta(seconds=12.5)
    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "3")  # DeepSpeed's variable is in minutes
    assert resolve_timeout(None) == timedelta(minutes=3)
    with pytest.raises(ValueError, match="positive seconds"):
        resolve_timeout(0)


@pytest.mark.parametrize("spec", ["kill:1", "explode:0:3", "kill:a:3", "kill:0:-1"])
def test_bad_fault_spec_is_refused(spec):
    with pytest.raises(ValueError, match="KIND:RANK:STEP"):
        Fault.parse(spec)


def test_fault_fires_only_where_and_when_due():
    fault = Fault.parse("nan:1:3")
    assert fault == Fault("nan", 1, 3)
    assert not fault.fire("nan", 0, 3) and not fault.fire("nan", 1, 2) and not fault.fire("kill", 1, 3)
    assert fault.fire("nan", 1, 3)


def test_consecutive_skips_beyond_the_limit_stop_the_run():
    skips = SkipCounter(2)
    for step, skipped in enumerate([True, True, False, True, True], start=1):
        skips.record(step, skipped)
    with pytest.raises(NonFiniteError, match="3 consecutive steps skipped up to step 6"):
        skips.record(6, True)
    with pytest.raises(ValueError, match="--max-skips"):
        SkipCounter(-1)


def _fresh(rank, world, ckpt_dir):
    return begin_fresh(ckpt_dir)


def test_fresh_start_forgets_an_earlier_runs_latest(tmp_path):
    (tmp_path / "step4").mkdir()
    (tmp_path / "latest").write_text("step4")
    assert run_ranks(_fresh, 2, str(tmp_path)) == [0, 0]
    assert not (tmp_path / "latest").exists() and (tmp_path / "step4").is_dir()
