"""Random numbers in a sharded forward, as DTensor's RNG tracker keeps them.

``parallelize``'s pre-hook agrees on one seed per forward call (the first rank's draw, carried in
the agreement's one all-gather) and runs the forward with the default generators seeded by it;
the post-hook gives the user's generator states back. During a parallelized forward every rank's
generators are therefore in the same state, whatever each rank seeded:

- a random op on a replicated value (dropout in a head, noise added after a global pooling)
  draws the same values on every rank;
- a random op on a sharded activation draws from a seed mixed from one draw of that shared
  generator and the shard's global offsets: independent values on each shard. They are not the
  values one device would draw for the whole tensor (the same distribution, other numbers).

Activation checkpointing saves and restores the generator states it ran with, so a recomputed
mask equals the first one. A run is reproducible from the first rank's seed (``torch.manual_seed``
before the step). Outside a parallelized forward, a replicated random op is refused: nothing
shows that the ranks' generators agree.
"""
from __future__ import annotations

import contextlib

import torch

from nonlocal_dist.distributed.checks import digest

_SEED_RANGE = 2**62
_AGREED_BIT = 2**62  # set in a seed that an agreement chose (draws are below it): no state to keep


def draw_seed() -> int:
    """One draw of the default CPU generator (each rank's own; the agreement keeps the first's)."""
    return int(torch.randint(0, _SEED_RANGE, (1,)).item())


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def enter_agreed(seed: int, device: torch.device) -> tuple:
    """Seed the default generators (CPU, and ``device`` if CUDA) with ``seed``; return what
    ``leave_agreed`` needs to give the previous states back."""
    saved = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if _cuda(device) else None, device)
    seed |= _AGREED_BIT
    torch.default_generator.manual_seed(seed)
    if _cuda(device):
        torch.cuda.default_generators[_index(device)].manual_seed(seed)
    return saved


def leave_agreed(saved: tuple) -> None:
    cpu, cuda, device = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def generators_agreed(device: torch.device) -> bool:
    """Whether the generator a random op on ``device`` draws from was set by an agreement (in a
    parallelized forward, or in its recomputation by a checkpoint)."""
    seed = torch.cuda.default_generators[_index(device)].initial_seed() if _cuda(device) else torch.initial_seed()
    return bool(seed & _AGREED_BIT)


def check_agreed(op, device: torch.device) -> None:
    """Refuse ``op`` (a ``sharded.Op``; on every rank) where it must draw alike on every rank but the
    generator it draws from was not set by an agreement."""
    if not generators_agreed(device):
        raise op.refuse("a random op on a value every rank holds alike would draw different values on each rank",
                        fix="run it inside a parallelized model (its forward agrees on one seed), or draw it "
                            "before sharding")


@contextlib.contextmanager
def shard_seeded(offsets: tuple[int, ...], device: torch.device):
    """Run a random op on one shard from its own seed: one draw of the default CPU generator (the
    same on every rank in a parallelized forward) mixed with the shard's global ``offsets``."""
    seed = digest((draw_seed(), offsets)) % _SEED_RANGE
    devices = [_index(device)] if _cuda(device) else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[devices[0]].manual_seed(seed)
        yield
