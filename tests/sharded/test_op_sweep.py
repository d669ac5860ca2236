"""The op sweep on a fixed sample of ops (every family with rules, and some without): no case may be
BAD (wrong, hung, an error, refused on some ranks only). Leaks not fixed yet are listed in
``KNOWN_LEAKS`` strictly: a new BAD case fails, and so does a listed case that stops being BAD (take
it off the list). The whole sweep: ``python scripts/op_sweep.py``."""
from __future__ import annotations

import importlib.util

from nonlocal_dist.sharded.sweep import KINDS, enumerate_cases, run_cases

OPS = [
    # position-wise
    "add", "mul", "where", "masked_fill", "exp", "abs", "sigmoid", "clamp", "nn.functional.relu", "nn.functional.gelu",
    "to", "nn.functional.dropout",
    # reductions
    "sum", "mean", "amax", "amin", "var", "std", "nn.functional.adaptive_avg_pool2d", "cumsum", "sort",
    # shapes and indexing
    "reshape", "view", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "expand", "expand_as", "view_as",
    "__getitem__", "cat", "stack", "split", "chunk",
    # windows, resampling, normalisation, contraction
    "nn.functional.conv1d", "nn.functional.conv2d", "nn.functional.conv_transpose1d", "nn.functional.max_pool2d",
    "nn.functional.avg_pool1d", "nn.functional.pad.constant", "nn.functional.pad.reflect",
    "nn.functional.interpolate.nearest", "nn.functional.interpolate.linear", "nn.functional.batch_norm",
    "nn.functional.group_norm", "nn.functional.instance_norm", "nn.functional.layer_norm", "nn.functional.linear",
    "matmul",
]

# str(case) of every BAD case not fixed yet, with why.
KNOWN_LEAKS: dict[str, str] = {}


def test_no_bad_case_in_the_sweep_sample():
    # Not a skip: without expecttest (which torch's OpInfo database imports) this test must fail.
    assert importlib.util.find_spec("expecttest"), "install expecttest (pip install expecttest) for torch's OpInfo"
    cases = enumerate_cases(OPS, KINDS, samples_per_op=2)
    verdicts = run_cases(cases, timeout=30.0)
    bad = {str(v.case): v.reason for v in verdicts if v.label == "BAD"}
    new = {c: r for c, r in bad.items() if c not in KNOWN_LEAKS}
    fixed = [c for c in KNOWN_LEAKS if c not in bad]
    assert not new, "new BAD cases:\n" + "\n".join(f"{c}: {r}" for c, r in new.items())
    assert not fixed, f"listed leaks that are no longer BAD (take them off KNOWN_LEAKS): {fixed}"
    assert sum(v.label == "exact" for v in verdicts) > len(verdicts) // 4, "the sample ran too few exact cases"
