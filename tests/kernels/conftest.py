from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_global_rng():
    # Tests elsewhere draw from the global generator: leave its state as these tests found it.
    with torch.random.fork_rng():
        yield
