"""The inventory of the devices backend: node servers already running on real machines.

Pure data (testbed.experiment.inventory reads it from an experiment's ``devices`` key or
an inventory file); testbed.backends.devices connects to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from testbed.net.topology import DeviceProfile

DEFAULT_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DeviceNode:
    """One device: a node server its user started (``python -m testbed.node --listen HOST:PORT``)."""

    name: str  # [A-Za-z0-9._-]+, unique in the inventory; names the device in errors and the manifest
    address: str  # HOST:PORT the node serves on, for the orchestrator and its peers alike
    device: DeviceProfile | None = None  # what the device is, as a topology states it (recorded; None: not stated)


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[DeviceNode, ...]  # in rank order
    tls: str | None = None  # directory made by `testbed certs` (absolute); None: plaintext gRPC
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S  # for reaching every node, and the nodes each other
    source: str | None = field(default=None, compare=False)  # the inventory file it was read from, if any

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def to_dict(self) -> dict:
        """The inline mapping an experiment's ``devices`` key reads back to an equal Inventory."""
        nodes = []
        for n in self.nodes:
            d: dict = {"name": n.name, "address": n.address}
            if n.device is not None:
                d["device"] = {k: v for k, v in vars(n.device).items() if v is not None}
            nodes.append(d)
        return {"nodes": nodes, **({"tls": self.tls} if self.tls else {}),
                "connect_timeout_s": self.connect_timeout_s}
