"""A persistent pool of gloo ranks that runs sweep cases one after the other, with a per-case timeout.

All cases of one world size run in one pool: ``world`` processes (each the leader of its
own process group, so a kill takes its children too) that loop over the same case list and report
every case's ``Outcome`` to the parent. The parent classifies each case once every rank has
reported it. When a case does not finish within ``timeout`` seconds (a hang) or a rank dies, that
case is recorded BAD and the pool is killed and restarted from the next case; so is it after a case
in which a rank raised anything but a refusal (the process group may be left mid-collective, and
``failure``'s notice stays in the store). After every case the ranks all-reduce its index: ranks
that took different collectives are caught there (a desync), not in the next case.
"""
from __future__ import annotations

import os
import queue as queues
import signal
import time
import warnings
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

import nonlocal_dist
from nonlocal_dist.sharded.sweep.cases import Case, op_infos, samples
from nonlocal_dist.sharded.sweep.check import Outcome, run_case
from nonlocal_dist.sharded.sweep.report import Verdict, classify, hung
from nonlocal_dist.testing import free_port, package_mismatch, rank_context, start_rank

STARTUP_TIMEOUT = 180.0  # spawning, importing torch's op database, joining the process group


def _mesh(rank: int, world: int) -> tuple:
    """The process groups of the mesh dims: the world for 2 and 3 ranks; rows and columns of 2x2."""
    if world != 4:
        return (dist.group.WORLD,)
    rows = [dist.new_group(r) for r in ([0, 1], [2, 3])]
    cols = [dist.new_group(c) for c in ([0, 2], [1, 3])]
    return rows[rank // 2], cols[rank % 2]


def _rank_main(rank: int, world: int, port: int, cases: list[Case], out, pg_timeout: float, package: str) -> None:
    start_rank()  # ends with the sweep's process, however that ends
    mismatch = package_mismatch(package)
    if mismatch is not None:
        raise RuntimeError(mismatch)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=pg_timeout))
    groups = _mesh(rank, world)
    infos = op_infos()
    needed: dict[str, int] = {}
    for case in cases:
        needed[case.op] = max(needed.get(case.op, 0), case.sample + 1)
    made: tuple[str, list] = ("", [])
    out.put((rank, -1, None))  # ready
    for index, case in enumerate(cases):
        if made[0] != case.op:
            made = (case.op, samples(infos[case.op], needed[case.op]))
        outcome = run_case(infos[case.op], made[1][case.sample], case, groups)
        flag = torch.tensor([index + 1])
        dist.all_reduce(flag)
        if flag.item() != (index + 1) * world:
            outcome = Outcome("error", f"desync: the ranks left case {index} at different collectives")
        out.put((rank, index, (outcome.status, outcome.detail, outcome.random)))
    out.close()
    out.join_thread()
    os._exit(0)  # the parent ends the pool; no teardown to wait for


class _Pool:
    def __init__(self, world: int, cases: list[Case], pg_timeout: float) -> None:
        ctx = rank_context()  # each rank imports torch's op database itself: kept out of the shared server
        self.world, self.queue = world, ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_rank_main, args=(r, world, port, cases, self.queue, pg_timeout,
                                                                  nonlocal_dist.__file__))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def get(self, timeout: float):
        """The next report, or None when none came within ``timeout`` seconds."""
        try:
            return self.queue.get(timeout=timeout)
        except queues.Empty:
            return None

    def dead(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.exitcode is not None]

    def close(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.join(timeout=10)
        self.queue.close()


def _start(pool: _Pool, world: int) -> list[tuple]:
    """Wait for every rank's ready message; return the case reports that came before them (a fast
    rank may finish the first case while a slow one is still starting)."""
    ready, early, deadline = 0, [], time.monotonic() + STARTUP_TIMEOUT
    while ready < world:
        msg = pool.get(1.0)
        if msg is not None:
            if msg[1] == -1:
                ready += 1
            else:
                early.append(msg)
        elif pool.dead() or time.monotonic() > deadline:
            raise RuntimeError(f"the sweep's {world}-rank pool did not start (dead ranks: {pool.dead()})")
    return early


def _drive(pool: _Pool, cases: list[Case], timeout: float, record: Callable[[Verdict], None],
           early: list[tuple] = ()) -> int:
    """Collect the pool's reports in case order (``early``: those that came during the start); return
    how many cases it got through (it stops after the first case that needs a restart)."""
    reports: dict[int, dict[int, tuple]] = {}
    for rank, index, outcome in early:
        reports.setdefault(index, {})[rank] = outcome
    current, deadline = 0, time.monotonic() + timeout
    while current < len(cases):
        msg = pool.get(0.5)
        if msg is None:
            dead = pool.dead()
            if dead or time.monotonic() > deadline:
                record(hung(cases[current], reports.get(current, {}), dead, timeout))
                return current + 1
            continue
        rank, index, outcome = msg
        reports.setdefault(index, {})[rank] = outcome
        while len(reports.get(current, ())) == pool.world:
            verdict = classify(cases[current], reports.pop(current))
            record(verdict)
            current, deadline = current + 1, time.monotonic() + timeout
            if verdict.restart:
                return current
    return current


def run_cases(cases: list[Case], timeout: float = 30.0, pg_timeout: float = 60.0,
              progress: Callable[[Verdict], None] | None = None) -> list[Verdict]:
    """Every case classified, in the given order; one pool per world size (restarted after a hang,
    a crash or an error). ``timeout``: seconds one case may take on the pool."""
    verdicts: dict[int, Verdict] = {}
    for world in sorted({c.world for c in cases}):
        indices = [i for i, c in enumerate(cases) if c.world == world]
        done = 0
        while done < len(indices):
            todo = [cases[i] for i in indices[done:]]
            got: list[Verdict] = []

            def record(v: Verdict) -> None:
                verdicts[indices[done + len(got)]] = v
                got.append(v)
                if progress is not None:
                    progress(v)

            pool = _Pool(world, todo, pg_timeout)
            try:
                early = _start(pool, world)
                done += _drive(pool, todo, timeout, record, early)
            finally:
                pool.close()
    return [verdicts[i] for i in range(len(cases))]
