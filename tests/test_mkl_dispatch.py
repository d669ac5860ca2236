"""oneMKL's vector-math dispatch race (pytorch/pytorch#188792) cannot reach results once the package is
imported: in fresh processes, the first multi-threaded float64 call of several VML-backed ops is exact."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

# Each VML-backed op's first call in the process, float64 then float32, on 2 x 2048 elements so that two
# threads take a chunk each; compared with Python's math module (glibc, under 1 ulp) element by element.
_FIRST_CALLS = """
import math, torch
import nonlocal_dist
x = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.9 + 0.05
worst = {}
for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 3e-7)):
    xd = x.to(dtype)
    for name in ("exp", "sqrt", "sin", "cos", "tan", "log", "log2", "log10", "tanh", "erf", "erfc", "atan",
                 "asin", "acos"):
        got = getattr(torch, name)(xd).tolist()
        want = [getattr(math, name)(v) for v in xd.tolist()]
        err = max(abs(a - b) / abs(b) for a, b in zip(got, want))
        if err > tol:
            worst[f"{name} {dtype}"] = err
print(repr(worst))
"""


# torch's ops whose float kernels call VML (ATen/cpu/vml.h's IMPLEMENT_VML_MKL), listed apart from the package's.
VML_NAMES = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
             "tan", "tanh", "trunc")

_IMPORT_CALLS = f"""
import threading, torch
calls = set()
def recording(name, op):
    def call(x):
        calls.add((name, str(x.dtype), x.numel(), threading.current_thread() is threading.main_thread()))
        return op(x)
    return call
for name in {VML_NAMES!r}:
    setattr(torch, name, recording(name, getattr(torch, name)))
import nonlocal_dist
print(repr(sorted(calls)))
"""

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is built without MKL: no VML")


@needs_mkl
def test_import_calls_every_vml_op_once_per_dtype_on_one_element():
    out = subprocess.run([sys.executable, "-c", _IMPORT_CALLS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    calls = eval(out.stdout)  # a list of tuples printed by the child
    assert calls == sorted((n, d, 1, True) for n in VML_NAMES for d in ("torch.float32", "torch.float64"))


@needs_mkl
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one intra-op thread: no concurrent first call")
def test_first_threaded_vml_calls_are_exact_after_import():
    # Without the package's warm-up, 1 to 2 processes in 12 got a first float64 exp off by 3e-9 here.
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_CALLS], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert eval(out) == {}  # ops whose first call missed the tolerance, with their errors
