"""The contract between the experiment runner and what runs the ranks (in-process, loopback, Mininet, sim,
real devices).

The runner drives every backend the same way: ``start(n)`` once, then per cell
``apply_profile``, per method ``load(job)`` and ``infer()`` for each inference (one
``InferenceResult``), ``close()`` at the end, also after errors and signals. What
differs between backends is part of the interface, with the defaults below: how links
are shaped (``mechanism``), whether outputs are computed (``computes``) and traces kept
(``keeps_traces``), live bandwidth traces (``replay`` / ``stop_replays``), the link
fidelity measurement (``measures_fidelity`` / ``fidelity_table``), bytes on the wire
(``wire_bytes``), the ids of emulated networks, shaping details and the nodes' machines for the
manifest (``run_ids``, ``shaping_details``, ``machines``), and the
scheduled faults it can inject (``FAULTS``: ``link_down`` / ``link_up``,
``set_link_profile`` / ``restore_link``, ``kill_node``; called from the fault thread of
testbed.experiment.faults while an inference runs).

``NodeBackend`` is the shared implementation of the backends that start one node
server per rank (``python -m testbed.node``): subclasses start the nodes and hand out
their addresses; loading and inferring go through one Orchestrator (testbed.node).

Every backend is built from a ``BackendSetup``: what the runner prepared once per run.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from testbed.errors import CommError, ConfigError
from testbed.methods.job import JobSpec
from testbed.net.profile import LinkProfile
from testbed.node.records import InferenceResult, NodeAddress


@dataclass
class BackendSetup:
    """What a backend is built from, prepared once per run by the runner (nothing parsed twice)."""

    nodes: int  # ranks, one per node
    timeout_s: float = 120.0  # deadline of one inference
    log_dir: Path | None = None  # where node logs stay (None: a temporary directory)
    run_dir: Path | None = None  # the run's results directory (a backend may write its own record there)
    topology: Any = None  # testbed.net.topology.Topology, the experiment's devices on the node hosts
    topology_source: Any = None  # the experiment's ``topology`` as written (a name, a path, a mapping)
    devices: list = field(default_factory=list)  # testbed.net.topology.DeviceProfile of every rank
    seed: int = 0  # of randomness in the links (jitter, sampled loss)
    time_dilation: float = 1.0
    cpu_slice_ms: float | None = None  # testbed.net.cgroups (None: its default)
    pace_compute: bool = True  # nodes under a CPU quota hold compute segments to device time (mininet)
    network_core: bool = False  # a host core kept for the network, no device on it (mininet)
    settings: dict[str, Any] = field(default_factory=dict)  # backend-specific options (see each backend)
    machine: Any = None  # what the backend's check_available() found, once per run (mininet: the kernel probe)
    inventory: Any = None  # testbed.backends.inventory.Inventory: the node servers of backend devices
    log: Callable[[str], None] = lambda _msg: None  # told about slow steps


class Backend(ABC):
    name: str = "?"
    #: how links are shaped: "none" (in-process, loopback), "htb+netem", "htb+nfqueue", "sim/measured", ...
    mechanism: str = "none"
    #: whether inferences compute outputs (agreement with the reference); False: rows say NaN
    computes: bool = True
    #: whether the nodes compute on this host (their speed is this host's: rows record a host probe)
    computes_here: bool = True
    #: whether links are shaped (or simulated) to the experiment's profiles; False: they are whatever
    #: this host's loopback or memory gives, and a profile's delay says nothing about them
    shapes_links: bool = True
    #: whether results carry per-rank schedule traces worth storing
    keeps_traces: bool = True
    #: whether fidelity_table() measures the links
    measures_fidelity: bool = False
    #: the keys of BackendSetup.settings this backend takes
    SETTINGS: tuple[str, ...] = ()
    #: the fault kinds it can inject (testbed.experiment.faults.KINDS)
    FAULTS: tuple[str, ...] = ()
    #: what the latest load() reported per node process (testbed.node.records.LoadTimes: build time,
    #: resident memory once built); one entry for the in-process backend's one process, none for sim
    load_times: list = []

    @classmethod
    def check_available(cls) -> Any:
        """Raise testbed.net.probe.EmulationUnavailable (with the fix) if this machine cannot run the
        backend; creates nothing. Returns what it learnt about the machine (handed back to the
        backend as BackendSetup.machine, so nothing is probed twice), or None."""
        return None

    @classmethod
    def from_setup(cls, setup: BackendSetup) -> "Backend":
        """The backend for one run, built but not started (cheap; raises EmulationUnavailable or
        ConfigError before anything is created)."""
        return cls()

    @abstractmethod
    def start(self, n_nodes: int) -> Any:
        """Start what runs the ``n_nodes`` ranks."""

    @abstractmethod
    def apply_profile(self, profile: LinkProfile) -> None:
        """Reshape every emulated link live (no teardown). Unshaped backends accept only an unshaped profile."""

    def prepare(self, jobs: list[JobSpec]) -> None:
        """Every job the run will load, told once before the first load: a backend that can ready
        them better all at once than one by one does it here (the simulator measures the compute
        profiles it lacks together). Nothing by default; a job it cannot run is left to ``load``."""

    @abstractmethod
    def load(self, job: JobSpec) -> None:
        """Build every rank's shard of ``job`` (replacing the previous job)."""

    @abstractmethod
    def infer(self, repetition: int | None = None) -> InferenceResult:
        """One inference of the loaded job. ``repetition``: the row's repetition index (None: a
        warm-up); a model-based backend seeds its randomness with it, so resumed runs agree."""

    @abstractmethod
    def close(self) -> None:
        """Stop everything and remove everything this backend created. Idempotent."""

    def wire_bytes(self) -> int | None:
        """Bytes sent on the data plane of all nodes since start (a running counter), if known."""
        return None

    def retransmitted_segments(self) -> int | None:
        """TCP segments all nodes retransmitted since start (a running counter), if known."""
        return None

    def device_probe_s(self) -> list[float] | None:
        """The host probe (testbed.models.probe) timed inside every node at once, as the devices
        compute (under their CPU quotas where they have them): CPU seconds per block in rank order,
        or None where the nodes are not processes of their own (call between inferences)."""
        return None

    def replay(self, trace, profile: LinkProfile | None = None, loop: bool = True):
        """Replay a testbed.net.replay.BandwidthTrace on every swept link until stop_replays()."""
        raise ConfigError("sweep.traces", f"a bandwidth trace of {trace.duration_s:g} s",
                          f"a backend that replays traces (mininet), not {self.name}")

    def stop_replays(self) -> None:
        pass

    def fidelity_table(self, seconds: float = 2.0) -> list[dict]:
        """What the links really do, one row per distinct path (only if measures_fidelity)."""
        raise ConfigError("backend", self.name, "a backend that measures link fidelity (mininet)")

    def run_ids(self) -> list[str]:
        """Ids of the emulated networks this backend made (what `testbed clean` knows them by)."""
        return []

    def machines(self) -> list[dict]:
        """What each node's machine is, in rank order, for the manifest (devices: host name, kernel,
        CPU model and core count as each node reports them); [] when the nodes run on this machine
        (the manifest's ``machine``)."""
        return []

    def shaping_details(self) -> dict:
        """What the manifest records beside ``mechanism`` about how links are shaped (mininet:
        ``delay_held``, how many host-to-host paths hold their delay where; see testbed.net.tc)."""
        return {}

    # -- faults (only the kinds in FAULTS; check_spec refuses the others before a run) -------------
    def link_down(self, a: str, b: str) -> None:
        """Let no packet cross the topology link between ``a`` and ``b`` until link_up()."""
        raise ConfigError("faults", "link_down", f"a backend with emulated links (mininet), not {self.name}")

    def link_up(self, a: str, b: str) -> None:
        raise ConfigError("faults", "link_down", f"a backend with emulated links (mininet), not {self.name}")

    def set_link_profile(self, a: str, b: str, fields: dict) -> None:
        """Change ``fields`` (LinkProfile's, device time) of both directions of one link, until restore_link()."""
        raise ConfigError("faults", "link_profile", f"a backend with emulated links (mininet), not {self.name}")

    def restore_link(self, a: str, b: str) -> None:
        """Give the link back the current cell's profile."""
        raise ConfigError("faults", "link_profile", f"a backend with emulated links (mininet), not {self.name}")

    def kill_node(self, rank: int) -> None:
        """SIGKILL the node of ``rank`` (the runner starts fresh nodes for the next unit)."""
        raise ConfigError("faults", "node_kill", f"a backend of node processes (loopback, mininet), not {self.name}")

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NodeBackend(Backend):
    """A backend of node server processes, driven by one Orchestrator (made at the first load)."""

    timeout_s: float = 120.0
    FAULTS = ("node_kill",)

    def __init__(self) -> None:
        self.addresses: list[NodeAddress] = []
        self._client: Any = None
        self.procs: list[subprocess.Popen] = []  # the node processes, in rank order
        self.log: Callable[[str], None] = lambda _msg: None  # told about slow steps (BackendSetup.log)

    def kill_node(self, rank: int) -> None:
        self.procs[rank].kill()

    def start(self, n_nodes: int) -> list[NodeAddress]:
        """Start one node server per rank; return their addresses in rank order."""
        self.addresses = self.start_nodes(n_nodes)
        return list(self.addresses)

    @abstractmethod
    def start_nodes(self, n_nodes: int) -> list[NodeAddress]:
        """Start the node servers; their addresses in rank order."""

    def client(self, addresses: list[NodeAddress], timeout_s: float, load_timeout_s: float | None = None):
        """The handle on the nodes (load / infer / shutdown); building a large model on N nodes
        sharing few cores can take minutes, hence the longer load deadline."""
        from testbed.node.orchestrator import Orchestrator

        return Orchestrator(addresses, timeout_s=timeout_s,
                            load_timeout_s=load_timeout_s if load_timeout_s is not None else max(300.0, timeout_s))

    def load(self, job: JobSpec) -> None:
        if not self.addresses:
            raise ConfigError("backend", f"{self.name} (not started)", "start() before load()")
        if self._client is None:
            self._client = self.client(self.addresses, self.timeout_s)
        self.load_times = list(self._client.load(job))

    def infer(self, repetition: int | None = None) -> InferenceResult:
        if self._client is None:
            raise ConfigError("job", None, "a job loaded with load() before infer()")
        return self._client.infer()

    def device_probe_s(self) -> list[float] | None:
        if self._client is None:
            raise ConfigError("job", None, "a job loaded with load() before device_probe_s()")
        return self._client.probe()

    def close(self) -> None:
        """Stop the nodes' job (Shutdown), then the processes and whatever the subclass created."""
        client, self._client, self.addresses = self._client, None, []
        try:
            if client is not None:
                client.shutdown()
        finally:
            self.close_nodes()

    @abstractmethod
    def close_nodes(self) -> None:
        """Stop the node processes and remove what start_nodes() created. Idempotent."""


def read_lines(proc: subprocess.Popen, n: int, deadline: float) -> list[str]:
    """Up to ``n`` lines from the process's stdout before ``deadline`` (fewer if it exits)."""
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while buf.count(b"\n") < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if sel.select(timeout=min(left, 0.2)):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
            elif proc.poll() is not None:
                break
    return buf.decode(errors="replace").splitlines()[:n]


def ready_addresses(lines: list[str]) -> list[str]:
    """The host:port addresses a node server printed (testbed.node.server.READY_PREFIX lines)."""
    from testbed.node.server import READY_PREFIX

    return [ln[len(READY_PREFIX):].strip() for ln in lines if ln.startswith(READY_PREFIX)]


def node_not_ready(who: str, proc: subprocess.Popen, lines: list[str], waited_s: float, log: Path) -> CommError:
    """Why a node gave no usable address (it exited, or printed something else, or nothing in time)."""
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass
    why = (f"exited with code {proc.returncode}" if proc.returncode is not None
           else f"printed {lines!r} within {waited_s:g} s" if lines else f"printed no address within {waited_s:g} s")
    return CommError(f"{who} {why}; its log ({log}):\n{log_tail(log)}")


def log_tail(path: Path, n_bytes: int = 2000) -> str:
    """The end of a node's log, for error messages that say why a node did not come up."""
    try:
        return path.read_bytes()[-n_bytes:].decode(errors="replace")
    except OSError:
        return "(no log)"
