"""Node tests share one set of four loopback node processes (starting them takes seconds)."""

from __future__ import annotations

import pytest

from testbed.backends.loopback import LoopbackBackend


@pytest.fixture(scope="module")
def loopback4():
    """Four running node servers (127.0.0.1-4); their NodeAddresses in rank order."""
    with LoopbackBackend() as backend:
        yield backend.start(4)
