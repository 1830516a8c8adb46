"""Without root or Mininet, the mininet backend says so once, with the fix and the alternative."""

from __future__ import annotations

import builtins
import os

import pytest

from testbed.net.probe import EmulationUnavailable


def test_not_root_gives_the_fix_and_points_to_loopback(monkeypatch):
    from testbed.backends.mininet import MininetBackend

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationUnavailable) as e:
        MininetBackend("star")
    msg = str(e.value)
    assert "root" in msg and "sudo make" in msg and "loopback" in msg


def test_missing_mininet_gives_the_fix(monkeypatch):
    from testbed.backends.mininet import MininetBackend

    real_import = builtins.__import__

    def no_mininet(name, *args, **kwargs):
        if name.startswith("mininet"):
            raise ImportError("No module named 'mininet'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(builtins, "__import__", no_mininet)
    with pytest.raises(EmulationUnavailable) as e:
        MininetBackend("star")
    assert "Mininet" in str(e.value) and "sudo make setup" in str(e.value)
