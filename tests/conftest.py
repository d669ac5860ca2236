from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """Every temporary file of the run under pytest's own base directory (which pytest prunes to the
    last three runs): the ranks' and launchers' (torchrun's ``torchelastic_*``, W&B's media and
    artifact folders, multiprocessing's ``pymp-*``) through ``TMPDIR``, which the processes the tests
    start inherit, and this process's through ``tempfile``. Without it a killed launch (the fault
    tests) left its folders in /tmp, run after run."""
    root = tmp_path_factory.mktemp("tmp", numbered=False)
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(root), str(root)
    yield
    tempfile.tempdir = saved_dir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
