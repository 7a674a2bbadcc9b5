"""Test-wide settings and shared pieces: Ray's environment, one torch thread for the tiny models, the token cache.
The tiny sweep the Ray tests run is `sweeps.tiny.tiny_sweep` (shared with scripts/kill_check.py).

Every Ray started by a test in this process must see the same token-auth mode: Ray reads it once per process,
and a test that starts Ray with auth on (Ray 2.60's default) breaks every later Ray of the session that turns
it off (workers die before they run). So auth is off and usage stats are off for the whole test session; this
is for tests only, users keep Ray's defaults.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

TEST_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(TEST_RAY_ENV)


@pytest.fixture(scope="session")
def ray_env(tmp_path_factory: pytest.TempPathFactory):
    """A short private temp folder for embedded Rays (Unix socket paths must be short); removed afterwards."""
    tmp_path_factory.getbasetemp()  # pytest's own temp root stays where it was, outside the folder below
    tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("TMPDIR", tmp)
        tempfile.tempdir = None  # re-read TMPDIR
        yield tmp
    tempfile.tempdir = None
    shutil.rmtree(tmp, ignore_errors=True)  # Ray's session logs


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for the session: every test corpus is tokenized once, whichever module needs it first."""
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: a second intra-op thread only adds synchronisation, and on a shared 2-core machine
    oversubscription made their training steps 10-30x slower. Restored after the module."""
    import torch

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)
