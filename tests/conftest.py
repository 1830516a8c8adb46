"""Shared test fixtures and the `root` marker.

Tests marked `root` need root, Mininet and tc; elsewhere they are skipped with the reason shown
(never silently passing). CI runs as root, so they run there.
"""

from __future__ import annotations

import os
import shutil

import pytest

import testbed  # noqa: F401  (sets gRPC's fork-support switch before any test module imports grpc)


def emulation_unavailable() -> str | None:
    """Why emulation tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, iptables); run `sudo make test`"
    for tool in ("mnexec", "tc", "ip", "iptables-legacy"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found; `make setup` as root installs it"
    try:
        import mininet  # noqa: F401
    except ImportError:
        return "Mininet's Python API is not importable; `make setup` as root installs it"
    return None


def pytest_collection_modifyitems(config, items):
    reason = emulation_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _own_user_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty user cache (XDG_CACHE_HOME): no test reads what another one cached,
    and none writes into the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
