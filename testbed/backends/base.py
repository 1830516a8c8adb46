"""The contract between the experiment runner and where nodes run (loopback, Mininet).

A backend starts one node server per rank (``python -m testbed.node``), tells the
runner where to reach them, reshapes links between experiment cells, and tears
everything down on close, also after errors and signals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from testbed.net.profile import LinkProfile
from testbed.node.records import NodeAddress  # noqa: F401  (backends hand these out)


class Backend(ABC):
    name: str = "?"
    #: how links are shaped: "none" (loopback), "htb+netem", "htb+nfqueue"
    mechanism: str = "none"

    @abstractmethod
    def start(self, n_nodes: int) -> list[NodeAddress]:
        """Start one node server per rank; return their addresses in rank order."""

    @abstractmethod
    def apply_profile(self, profile: LinkProfile) -> None:
        """Reshape every emulated link live (no teardown). Loopback accepts only an unshaped profile."""

    def wire_bytes(self) -> int | None:
        """Bytes sent on the data-plane interfaces of all nodes since start (interface counters), if known."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Stop nodes and remove everything this backend created. Idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_tail(path: Path, n_bytes: int = 2000) -> str:
    """The end of a node's log, for error messages that say why a node did not come up."""
    try:
        return path.read_bytes()[-n_bytes:].decode(errors="replace")
    except OSError:
        return "(no log)"
