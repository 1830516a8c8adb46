"""Devices backend: the experiment's ranks on node servers already running on real machines.

Each device's user started ``python -m testbed.node --listen 0.0.0.0:PORT`` there (as root, or
with CAP_NET_ADMIN, for shaped profiles); the experiment's ``devices`` inventory
(testbed.backends.inventory) says where, in rank order. The nodes belong to their users:

- ``start()`` connects to every node (one error naming the device that does not answer within
  ``connect_timeout_s``) and asks each for its Stats: a node running another testbed package
  or protocol version than this runner is refused (one error naming the device and both
  versions); each node's host name, kernel, CPU model and core count go into the manifest
  (``machines``).
- ``apply_profile()``: each node shapes its own egress towards every peer with the cell's
  LinkProfile (the Node service's Shape RPC), so every ordered pair of devices gets the
  profile host to host, as topologies/mesh.yaml does under Mininet; an unshaped profile
  removes all shaping. ``mechanism`` is what the nodes report they shape with.
- ``load()`` sends the job with its astra codebooks inline (the run directory is on this
  machine); model weights (``model.weights_path``) are read on each device at the same path.
- ``close()`` removes the shaping and unloads the job, and never stops a node: they keep
  serving for the next run. After a device drops, the runner records the unit failed and the
  next unit connects again (a device still gone fails that unit too, naming it).

Bytes on the wire (``wire_bytes``) are the tx byte counters of each node's data interface
(the one holding its inventory address), counted once per network stack and interface (nodes
on one host's loopback share one): every packet that interface sent, control plane and anything
else on the device included.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from testbed.backends.base import BackendSetup, NodeBackend
from testbed.backends.inventory import DeviceNode, Inventory
from testbed.comm.channels import join_hostport, split_hostport
from testbed.errors import CommError, ConfigError, check
from testbed.methods.job import JobSpec
from testbed.net.profile import LinkProfile
from testbed.node.records import PROTOCOL_VERSION, InferenceResult, NodeAddress, NodeStats

#: how long close() gives each device to drop its shaping and job (a device that is gone is skipped)
TIDY_TIMEOUT_S = 5.0


def expected_versions() -> tuple[str, int]:
    """(package version, protocol version) every node must run: this runner's own."""
    from testbed.node.host import package_version

    return package_version(), PROTOCOL_VERSION


class DevicesBackend(NodeBackend):
    name = "devices"
    mechanism = "none"  # until the nodes say what they shape with
    FAULTS = ()  # a real device is not killed, nor its links cut, by the testbed
    computes_here = False

    def __init__(self, inventory: Inventory, timeout_s: float = 120.0):
        super().__init__()
        check(isinstance(inventory, Inventory) and len(inventory.nodes) >= 1, "devices", inventory,
              "an inventory of at least one device")
        self.inventory, self.timeout_s = inventory, timeout_s
        self.tls_dir = inventory.tls  # `testbed certs` directory for the control and data channels (None: plaintext)
        self.data_hosts: list[str] = []  # per rank: the IP its peers reach it at
        self._machines: list[dict] = []
        self._wire0: int | None = None  # tx bytes of the data interfaces when start() connected
        self._shaped = False  # whether a Shape with links went out since start (close() removes it)

    @classmethod
    def from_setup(cls, setup: BackendSetup) -> "DevicesBackend":
        check(setup.inventory is not None, "devices", None, "an inventory of node servers (backend devices)")
        backend = cls(setup.inventory, timeout_s=setup.timeout_s)
        backend.log = setup.log
        return backend

    # -- start ----------------------------------------------------------------------
    def start_nodes(self, n_nodes: int) -> list[NodeAddress]:
        inv = self.inventory
        check(n_nodes == len(inv.nodes), "nodes.count", n_nodes, f"{len(inv.nodes)}, the inventory's devices")
        if self._client is not None:
            raise ConfigError("n_nodes", n_nodes, "one start() per backend (close() it first)")
        # peers dial each other at the IP this machine resolves (no name service needed on the devices);
        # each node's shaping matches its peers by those IPs
        self.data_hosts = [_resolve(d) for d in inv.nodes]
        addresses = [NodeAddress(control=d.address, data=join_hostport(ip, split_hostport(d.address)[1]))
                     for d, ip in zip(inv.nodes, self.data_hosts)]
        self.log(f"connecting to {n_nodes} devices")
        self._client = self.client(addresses, self.timeout_s)
        try:
            stats = self._client.stats(self.data_hosts)
            self._check_versions(stats)
            self._machines = [self._machine(i, s) for i, s in enumerate(stats)]
            self._wire0 = _tx_total(stats)
        except BaseException:  # nothing was asked of the nodes yet: leave them as they are
            client, self._client = self._client, None
            client.disconnect()
            raise
        return addresses

    def client(self, addresses: list[NodeAddress], timeout_s: float, load_timeout_s: float | None = None):
        """An orchestrator that never stops the nodes (they are their users'); a node that does not
        answer is named by its device."""
        from testbed.node.orchestrator import NodeError, Orchestrator

        if self._client is not None:
            return self._client
        try:
            return Orchestrator(addresses, timeout_s=timeout_s, connect_timeout_s=self.inventory.connect_timeout_s,
                                load_timeout_s=load_timeout_s if load_timeout_s is not None else max(300.0, timeout_s),
                                tls_dir=self.tls_dir, owns_nodes=False)
        except NodeError as e:
            d = self.inventory.nodes[e.rank]
            host, port = split_hostport(d.address)
            raise CommError(f"device {d.name!r} ({d.address}) cannot be reached within "
                            f"{self.inventory.connect_timeout_s:g} s: is `python -m testbed.node --listen "
                            f"0.0.0.0:{port}` running on {host}, and is the port open?") from None

    def _check_versions(self, stats: list[NodeStats]) -> None:
        package, protocol = expected_versions()
        for i, s in enumerate(stats):
            if (s.package_version, s.protocol_version) != (package, protocol):
                d = self.inventory.nodes[i]
                raise ConfigError(f"devices.nodes[{i}] ({d.name} at {d.address})",
                                  f"testbed {s.package_version or '?'}, protocol {s.protocol_version}",
                                  f"testbed {package or '?'}, protocol {protocol}, as this runner: install the same "
                                  "testbed on every device (`make setup` at the same commit) and restart its node")

    def _machine(self, rank: int, s: NodeStats) -> dict:
        d = self.inventory.nodes[rank]
        return {"rank": rank, "name": d.name, "address": d.address, "hostname": s.hostname, "kernel": s.kernel,
                "cpu_model": s.cpu_model, "cpu_count": s.cpu_count, "package_version": s.package_version,
                "protocol_version": s.protocol_version, "data_interface": s.data_interface,
                **({"device": {k: v for k, v in vars(d.device).items() if v is not None}} if d.device else {})}

    def machines(self) -> list[dict]:
        return [dict(m) for m in self._machines]

    # -- links --------------------------------------------------------------------------
    def apply_profile(self, profile: LinkProfile) -> None:
        """Every node shapes its egress to every peer with ``profile``; unshaped: no shaping at all."""
        if self._client is None:
            raise ConfigError("backend", "devices (not started)", "start() before apply_profile()")
        n = len(self.inventory.nodes)
        if profile.shaped:
            links = [{self.data_hosts[p]: profile for p in range(n) if p != r} for r in range(n)]
        else:
            links = [{} for _ in range(n)]
        self._shape(links)
        self._shaped = profile.shaped

    def _shape(self, links: list[dict[str, LinkProfile]]) -> None:
        shape = getattr(self._client, "shape", None)
        if shape is None:  # nodes of this version cannot shape: only the unshaped profile is possible
            if any(links):
                raise ConfigError("sweep", "a shaped link profile", "unshaped profiles only: this testbed's nodes "
                                  "have no Shape RPC")
            return
        try:
            shape(links)
        except CommError as e:
            raise self._named(e) from None
        mechanisms = getattr(self._client, "shape_mechanisms", None)  # what each node reported it shapes with
        if mechanisms:
            self.mechanism = "+".join(sorted(set(mechanisms)))

    # -- jobs -----------------------------------------------------------------------------
    def load(self, job: JobSpec) -> None:
        if self._client is None:
            raise ConfigError("backend", "devices (not started)", "start() before load()")
        codebooks = None
        if job.codebook_path:  # the run directory is on this machine, not on the devices
            try:
                with open(job.codebook_path, "rb") as f:
                    codebooks = f.read()
            except OSError as e:
                raise ConfigError("codebook_path", job.codebook_path, f"a readable codebook file ({e})") from None
        try:
            self.load_times = list(self._client.load(job, codebooks=codebooks))
        except CommError as e:
            raise self._named(e) from None

    def infer(self, repetition: int | None = None) -> InferenceResult:
        try:
            return super().infer(repetition)
        except CommError as e:
            raise self._named(e) from None

    def _named(self, e: CommError) -> CommError:
        """The orchestrator's error with the device's name in front (it names ranks and addresses)."""
        rank = getattr(e, "rank", None)
        if rank is None or not 0 <= rank < len(self.inventory.nodes):
            return e
        return CommError(f"device {self.inventory.nodes[rank].name!r}: {e}")

    def wire_bytes(self) -> int | None:
        """tx bytes of the nodes' data interfaces since start (once per network stack and interface); None if
        any is unreadable or a node does not answer."""
        if self._client is None or self._wire0 is None:
            return None
        try:
            now = _tx_total(self._client.stats(self.data_hosts))
        except Exception:  # noqa: BLE001 - a node that does not answer: the figure is unknown, the run goes on
            return None
        return None if now is None else now - self._wire0

    # -- stop ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every node's shaping and unload its job; the nodes keep serving. Idempotent."""
        client, self._client, self.addresses = self._client, None, []
        shaped, self._shaped = self._shaped, False
        if client is None:
            return
        try:
            if shaped:
                self._unshape()
        finally:
            client.release("the run is over")  # Unload on every node that answers

    def _unshape(self) -> None:
        """An empty Shape to every device on a channel of its own (the run's orchestrator may have let
        go of the nodes after a failure); a device that does not answer is named in the log."""
        from testbed.proto import node_pb2

        import grpc

        from testbed.comm import tls
        from testbed.comm.channels import CONTROL_CHANNEL_OPTIONS
        from testbed.proto import node_pb2_grpc

        creds = tls.channel_credentials(self.tls_dir, "orchestrator") if self.tls_dir else None

        def one(d) -> str | None:
            with tls.open_channel(d.address, CONTROL_CHANNEL_OPTIONS, creds) as ch:
                try:
                    node_pb2_grpc.NodeStub(ch).Shape(node_pb2.ShapeRequest(), timeout=TIDY_TIMEOUT_S)
                except grpc.RpcError as e:
                    return f"device {d.name!r} ({d.address}) kept its shaping: {e.code().name} {e.details()}"
            return None

        with ThreadPoolExecutor(max_workers=len(self.inventory.nodes)) as pool:
            for msg in pool.map(one, self.inventory.nodes):
                if msg:
                    self.log(msg)

    def close_nodes(self) -> None:
        """Nothing to stop: the nodes are their users' (close() unloads them)."""


def _resolve(d: DeviceNode) -> str:
    """The IP of a device's host (what peers reach it at, and what shaping matches)."""
    host, port = split_hostport(d.address)
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        raise CommError(f"device {d.name!r} ({d.address}): its host does not resolve here ({e})") from None


def _tx_total(stats: list[NodeStats]) -> int | None:
    """tx bytes summed over distinct (network stack, interface): nodes sharing one interface count it once."""
    seen: dict[tuple[str, str], int] = {}
    for s in stats:
        if s.tx_bytes is None or not s.data_interface:
            return None
        seen[(s.net_id, s.data_interface)] = s.tx_bytes
    return sum(seen.values())
