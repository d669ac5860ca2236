"""Verdicts of sweep cases and the markdown coverage table.

A case is ``exact`` (every rank equal to one process), ``refused`` (``ShardingRefusal`` on every
rank), ``unchecked`` (a random op: ran on every rank, values not comparable), ``skip`` (the sample
itself fails in one process) or ``BAD``: wrong (a value, shape, dtype or autograd flag), error (a
rank raised anything but a refusal), refused on some ranks only, hung, or crashed.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from nonlocal_dist.sharded.sweep.cases import Case, family, op_infos

LABELS = ("exact", "refused", "unchecked", "skip", "BAD")


@dataclass
class Verdict:
    case: Case
    label: str  # one of LABELS
    reason: str = ""
    restart: bool = False  # the pool must be restarted after this case

    def __str__(self) -> str:
        return f"{self.label}: {self.case} -- {self.reason}"


def classify(case: Case, reports: dict[int, tuple]) -> Verdict:
    """One verdict from every rank's ``(status, detail, random)``."""
    status = {r: s for r, (s, _, _) in reports.items()}
    detail = {r: d for r, (_, d, _) in reports.items()}
    kinds = set(status.values())
    ranks = sorted(reports)

    def on(s):
        return [r for r in ranks if status[r] == s]

    if "skip" in kinds:
        return Verdict(case, "skip", detail[on("skip")[0]])
    if "error" in kinds:
        first = on("error")[0]
        where = "every rank" if len(on("error")) == len(ranks) else f"ranks {on('error')} only"
        return Verdict(case, "BAD", f"error on {where}: {detail[first]}", restart=True)
    if kinds == {"refused"}:
        return Verdict(case, "refused", detail[ranks[0]])
    if "refused" in kinds:
        return Verdict(case, "BAD", f"refused on ranks {on('refused')} only: {detail[on('refused')[0]]}")
    if "mismatch" in kinds:
        return Verdict(case, "BAD", f"wrong on ranks {on('mismatch')}: {detail[on('mismatch')[0]]}")
    if any(random for _, _, random in reports.values()):
        return Verdict(case, "unchecked", "random output")
    return Verdict(case, "exact")


def hung(case: Case, reports: dict[int, tuple], dead: list[int], timeout: float) -> Verdict:
    """The verdict of a case the pool did not finish: ranks died, or some did not report in time."""
    done = ", ".join(f"rank {r} {s}{': ' + d if d else ''}" for r, (s, d, _) in sorted(reports.items()))
    what = f"crashed (ranks {dead} died)" if dead else f"hung (no result within {timeout:g}s)"
    return Verdict(case, "BAD", what + (f"; finished: {done}" if done else ""), restart=True)


def _op_label(labels: Counter) -> str:
    if labels["BAD"]:
        return "bad"
    run = {k for k, n in labels.items() if n and k != "skip"}
    if not run:
        return "skipped"
    if run <= {"exact", "unchecked"}:
        return "exact"
    return "refused" if run == {"refused"} else "partly"


def markdown(verdicts: list[Verdict], seconds: dict[int, float] | None = None) -> str:
    """The coverage table (per family: ops whose cases are all exact / all refused / mixed / with a
    BAD case, and case counts), run times per world size, and every BAD case with its reason."""
    infos = op_infos()
    per_op: dict[str, Counter] = defaultdict(Counter)
    for v in verdicts:
        per_op[v.case.op][v.label] += 1
    rows: dict[str, Counter] = defaultdict(Counter)
    for name, labels in per_op.items():
        row = rows[family(infos[name])]
        row["ops"] += 1
        row["ops " + _op_label(labels)] += 1
        row.update(labels)
    head = ["family", "ops", "ops exact", "ops refused", "ops partly", "ops bad", *LABELS]
    lines = ["# Op sweep: OpInfo samples on sharded activations", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = Counter()
    for fam in sorted(rows):
        total.update(rows[fam])
        lines.append("| " + " | ".join([fam, *(str(rows[fam][h]) for h in head[1:])]) + " |")
    lines.append("| **all** | " + " | ".join(str(total[h]) for h in head[1:]) + " |")
    if seconds:
        lines += ["", "Run time: " + ", ".join(f"{w} ranks {s:.0f}s" for w, s in sorted(seconds.items()))]
    bad = [v for v in verdicts if v.label == "BAD"]
    lines += ["", f"## BAD cases ({len(bad)})", ""]
    lines += [f"- `{v.case}` ({v.case.summary}): {v.reason}" for v in bad] or ["none"]
    return "\n".join(lines) + "\n"
