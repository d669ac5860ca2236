"""Resolve oneMKL's vector-math dispatch in one thread, before any op can race on it.

On x86 builds torch sends contiguous float32/float64 ``exp``, ``log``, ``sqrt``, ``sin``, ``tanh``,
``erf``, ... to oneMKL's vector math (VML), split over the intra-op threads in chunks of 2048
elements. oneMKL 2024.2, the version torch's x86 wheels bundle (2.8.0 to 2.14.1 here), chooses each
function's kernel on that function's first call. When the first call runs on several threads at once,
one thread can compute its whole chunk with the low-accuracy kernel although high accuracy is
requested (pytorch/pytorch#188792, up to about 4000 ulp). Measured here on 2 threads: about 1 process
in 12 gets a relative error of 3e-9 from its first float64 ``torch.exp`` on 2530 elements, and
3e-11 from ``torch.sqrt``; the next call is exact. That made the package's float64 results, and the
oracles its tests compare them with, inexact at random.

The fix proposed upstream (pytorch/pytorch#188791) is the one used here: one call on one element per
function and dtype, which runs in the calling thread, so every later call finds its kernel chosen.
"""
from __future__ import annotations

import torch

# torch's ops whose float32/float64 kernels call oneMKL's VML (ATen/cpu/vml.h, IMPLEMENT_VML_MKL).
VML_OPS = (torch.acos, torch.asin, torch.atan, torch.cos, torch.erf, torch.erfc, torch.erfinv, torch.exp,
           torch.log, torch.log10, torch.log2, torch.sin, torch.sqrt, torch.tan, torch.tanh, torch.trunc)


def resolve_vector_math() -> None:
    """Call every VML-backed op once on a one-element float32 and float64 tensor, in this thread.

    Cost: 32 one-element ops, about 1 ms at import. Nothing to do where torch has no MKL.
    """
    if not torch.backends.mkl.is_available():
        return
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            x = torch.full((1,), 0.5, dtype=dtype, device="cpu")  # not a default device the user set
            for op in VML_OPS:
                op(x)
