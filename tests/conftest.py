"""Test-session settings: one torch thread per process (tests run many processes on few cores;
more threads only spin-wait), no progress bars."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402

from hpctrain.local_launch import ENGINES  # noqa: E402


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each communication engine in turn, for tests of multi-rank behaviour."""
    return request.param
