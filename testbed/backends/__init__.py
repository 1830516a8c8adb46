"""Backends run the ranks of an experiment: in-process threads, node servers (loopback, Mininet, real
devices) or the simulator.

The layer stands on node, sim and net; experiment drives every backend through base.Backend.

``BACKENDS`` is the one registry (name -> where its class lives); ``backend_class`` imports
only the backend asked for (Mininet's and the simulator's modules pull in more).
"""

from __future__ import annotations

import importlib

BACKENDS = {
    "inprocess": "testbed.backends.inprocess:InProcessBackend",
    "loopback": "testbed.backends.loopback:LoopbackBackend",
    "mininet": "testbed.backends.mininet:MininetBackend",
    "sim": "testbed.backends.sim:SimBackend",
    "devices": "testbed.backends.devices:DevicesBackend",
}


def backend_class(name: str):
    """The Backend subclass registered as ``name``."""
    from testbed.errors import ConfigError

    if name not in BACKENDS:
        raise ConfigError("backend", name, " | ".join(BACKENDS))
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
