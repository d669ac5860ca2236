"""The ring simulated in one process (local_ring_attention): exact against the float64 oracle, and the
very schedule of the distributed ring (same kernel calls, same results bit for bit)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import rel_err
from oracle import naive_nonlocal

from nonlocal_dist.distributed.comm import RingComm, local_comms
from nonlocal_dist.distributed.shards import even_sizes
from nonlocal_dist.sequence import ring
from nonlocal_dist.sequence.ring import local_ring_attention, ring_attention
from nonlocal_dist.testing import run_ranks

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
# (B, H, N, M, d, dv, world): uneven shards, N != M, empty key shards (M < world) and empty query shards (N < world).
CASES = [(2, 3, 13, 10, 8, 5, 3), (1, 2, 17, 17, 6, 6, 4), (2, 1, 9, 4, 4, 7, 6), (1, 2, 3, 11, 5, 5, 5), (1, 1, 7, 7, 4, 4, 1)]


def _inputs(case, dtype, device, seed=0):
    b, h, n, m, d, dv, _ = case
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, h, n, d), (b, h, m, d), (b, h, m, dv), (b, h, n, dv)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]


def _run(q, k, v, grad_y, fn):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = fn(*leaves)
    y.backward(grad_y)
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("chunk", [None, 512, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_local_ring_matches_float64_oracle(device, case, dtype, tol, chunk, monkeypatch):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA fused kernels take no float64")
    monkeypatch.setattr(ring, "preferred_chunk", lambda device: chunk)  # 2: many uneven chunks per block
    q, k, v, grad_y = _inputs(case, dtype, device)
    got = _run(q, k, v, grad_y, lambda q, k, v: local_ring_attention(q, k, v, 0.3, case[-1]))
    want = _run(*(t.double() for t in (q, k, v, grad_y)), lambda q, k, v: naive_nonlocal(q, k, v, "embedded_gaussian", 0.3))
    for name, a, b in zip(("y", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= tol, f"{name}: rel err {rel_err(a, b):.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_local_ring_bf16_cuda():
    case = (2, 4, 1000, 1000, 64, 64, 4)
    q, k, v, grad_y = _inputs(case, torch.bfloat16, "cuda")
    got = _run(q, k, v, grad_y, lambda q, k, v: local_ring_attention(q, k, v, 0.125, 4))
    want = _run(*(t.double() for t in (q, k, v, grad_y)), lambda q, k, v: naive_nonlocal(q, k, v, "embedded_gaussian", 0.125))
    for name, a, b in zip(("y", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) <= 3e-2, f"{name}: rel err {rel_err(a, b):.2e}"


def _recording(monkeypatch, calls):
    """Wrap the ring's kernels and merge so that every call's shapes are recorded."""
    for name in ("attention_forward", "attention_backward", "merge_partial"):
        inner = getattr(ring, name)

        def wrapper(*args, _inner=inner, _name=name):
            calls.append((_name, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return _inner(*args)

        monkeypatch.setattr(ring, name, wrapper)


def _distributed(rank, world, case, chunk):
    import pytest as _pytest

    monkeypatch = _pytest.MonkeyPatch()
    monkeypatch.setattr(ring, "preferred_chunk", lambda device: chunk)
    calls = []
    _recording(monkeypatch, calls)
    q, k, v, grad_y = _inputs(case, torch.float64, "cpu")
    shard = lambda t: t.split(even_sizes(t.shape[-2], world), -2)[rank]  # noqa: E731
    m_sizes = list(even_sizes(k.shape[-2], world))
    results = _run(shard(q), shard(k), shard(v), shard(grad_y),
                   lambda q, k, v: ring_attention(q, k, v, 0.3, dist.group.WORLD, m_sizes))
    return results, calls


@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_local_ring_runs_the_distributed_schedule(case, monkeypatch):
    """Same kernel and merge calls with the same shapes, and bit-identical results, as on real gloo ranks."""
    world, chunk = case[-1], 2
    per_rank = run_ranks(_distributed, world, case, chunk, timeout=180)
    monkeypatch.setattr(ring, "preferred_chunk", lambda device: chunk)
    calls = []
    _recording(monkeypatch, calls)
    q, k, v, grad_y = _inputs(case, torch.float64, "cpu")
    local = _run(q, k, v, grad_y, lambda q, k, v: local_ring_attention(q, k, v, 0.3, world))
    assert sorted(calls) == sorted(c for _, rank_calls in per_rank for c in rank_calls)
    assert len(calls) > 3 * world  # the recording saw the schedule (many chunks per block)
    for name, got, parts in zip(("y", "dq", "dk", "dv"), local, zip(*(r for r, _ in per_rank))):
        assert torch.equal(got, torch.cat(parts, -2)), name


def test_local_comm_hands_tensors_to_the_next_rank_and_refuses_a_second_commit():
    comms = local_comms(3)
    received = [c.send_recv(torch.full((2,), float(c.rank)), (2,)) for c in comms]
    for c in comms:
        c.commit()
    with pytest.raises(RuntimeError, match="before wait"):
        comms[0].commit()
    for c in comms:
        c.wait()
    assert [r.tolist() for r in received] == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]
    comms[0].commit()  # allowed again after wait


def _ring_comm_guard(rank, world):
    comm = RingComm(dist.group.WORLD)
    got = comm.send_recv(torch.full((3,), float(rank)), (3,))
    comm.commit()
    try:
        comm.commit()
        message = "no error"
    except RuntimeError as exc:
        message = str(exc)
    comm.wait()
    return message, got.tolist()


def test_ring_comm_refuses_a_second_commit_before_wait():
    for rank, (message, got) in enumerate(run_ranks(_ring_comm_guard, 2, timeout=60)):
        assert "before wait" in message
        assert got == [float(1 - rank)] * 3


def test_local_ring_rejects_bad_world():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="positive int"):
        local_ring_attention(q, q, q, 1.0, 0)
