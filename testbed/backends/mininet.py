"""Mininet backend: one node server per emulated host, links shaped with tc, reshaped live.

The network (testbed.net.emulation.Emulation) is built once; rank i runs on the topology's
i-th host, inside that host's namespace and device cgroup, serving the data plane on the host's
emulated address (peers reach it across shaped links) and the control plane on the unshaped
control network (the orchestrator in the root namespace reaches it directly). Between
experiment cells ``apply_profile`` maps one sweep profile onto the topology
(Topology.with_sweep) and changes the running links in place.

Time dilation (``time_dilation`` F > 1): the emulated network is the topology made F times
slower (Topology.dilated: every device at speed / F, every link at bandwidth / F and delay x F),
each device's CPU quota at that speed and, with ``pace_compute``, every node holding each compute
segment to its CPU time at the quota's rate (a quota refilled while a device waited lets the next
segment run at host speed for up to one slice; testbed.comm.trace.CpuPacer),
every profile applied later and every bandwidth trace likewise; TCP's minimum retransmission
timeout on the host routes and the nodes' gRPC keepalive grow by F; ``client`` multiplies the
deadlines by F and divides every duration the nodes report by F (testbed.backends.dilation).
What stays undilated: the kernel's delayed-ACK timers (40-200 ms, no per-route knob), TCP's
initial 1 s RTO of a connection's SYN, and the timer resolution of the delay lines and of htb;
all of them are then F times shorter in device time than on a real link.

Not root, or no Mininet: EmulationUnavailable with the fix (`sudo make setup`) and a pointer to
the loopback backend, raised by the constructor, before anything is created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from testbed.backends.base import BackendSetup, NodeBackend, node_not_ready, read_lines, ready_addresses
from testbed.comm.channels import KEEPALIVE_TIMEOUT_S
from testbed.net.cgroups import DEFAULT_SLICE_MS, host_cpus
from testbed.errors import ConfigError, check
from testbed.net.probe import FIX, Capabilities, EmulationUnavailable, probe
from testbed.net.profile import LinkProfile
from testbed.net.replay import BandwidthTrace, TraceReplay
from testbed.net.topology import Topology, load_topology
from testbed.node.records import NodeAddress

LINUX_RTO_MIN_MS = 200.0  # TCP_RTO_MIN: the minimum retransmission timeout of Linux


def _quick_check() -> None:
    """The cheap half of the probe: root and Mininet's API (the kernel is probed by start())."""
    if os.geteuid() != 0:
        raise EmulationUnavailable(f"the mininet backend needs root (network namespaces, tc, iptables). Fix: {FIX}")
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        raise EmulationUnavailable(f"Mininet's Python API is not installed. Fix: {FIX}") from None


class MininetBackend(NodeBackend):
    name = "mininet"
    measures_fidelity = True
    FAULTS = ("link_down", "link_profile", "node_kill")

    def __init__(self, topology: Topology | str | dict, mechanism: str = "auto", start_timeout_s: float = 120.0,
                 log_dir: str | None = None, python: str = sys.executable, seed: int = 0,
                 time_dilation: float = 1.0, cpu_slice_ms: float = DEFAULT_SLICE_MS, timeout_s: float = 120.0,
                 capabilities: Capabilities | None = None, pace_compute: bool = True, network_core: bool = False):
        """``topology``: a Topology, a topologies/ name, a YAML path or an inline mapping, in
        device time. ``mechanism``: auto | htb+nfqueue | htb+netem. ``start_timeout_s``: for
        all nodes to print their addresses. ``log_dir``: node logs (stderr) stay there; default a
        temporary directory removed by close(). ``seed``: of the delay lines' jitter.
        ``time_dilation``: F >= 1 (see the module docstring). ``cpu_slice_ms``: see
        testbed.net.cgroups. ``timeout_s``: deadline of one inference, in device time.
        ``capabilities``: the kernel probe made by check_available (None: probed at start).
        ``pace_compute``: nodes whose device has a CPU quota pace their compute to it (see above).
        ``network_core``: keep the host's first core for the network (testbed.net.emulation's
        ``network_cpu``): the emulated links' packet processing is then not charged to the devices."""
        _quick_check()
        super().__init__()
        check(isinstance(start_timeout_s, (int, float)) and start_timeout_s > 0, "start_timeout_s",
              start_timeout_s, "a number of seconds > 0")
        check(isinstance(time_dilation, (int, float)) and not isinstance(time_dilation, bool) and time_dilation >= 1,
              "time_dilation", time_dilation, "a number >= 1")
        self.time_dilation, self.cpu_slice_ms, self.timeout_s = float(time_dilation), cpu_slice_ms, timeout_s
        self.pace_compute, self.network_core = bool(pace_compute), bool(network_core)
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        self.requested_mechanism, self.start_timeout_s, self.python, self.seed = mechanism, start_timeout_s, python, seed
        self._own_logs = log_dir is None
        self.log_dir = Path(log_dir) if log_dir else None
        self.emulation = None
        self.capabilities = capabilities
        self.profile = LinkProfile()  # the last sweep profile applied (device time)
        self.hosts: list[str] = []
        self.replays: list[TraceReplay] = []
        self._routes: dict[tuple[int, str], list[list[str]]] = {}  # host routes a link_down took away
        self.last_change_s: float | None = None

    @classmethod
    def check_available(cls) -> Capabilities:
        """Root, Mininet's API, then the kernel (htb, netem or NFQUEUE): its Capabilities."""
        _quick_check()
        caps = probe(full=False)
        caps.require()
        return caps

    @classmethod
    def from_setup(cls, setup: BackendSetup) -> "MininetBackend":
        """On the experiment's topology (its devices on the node hosts), loaded once by the runner."""
        backend = cls(setup.topology, log_dir=str(setup.log_dir) if setup.log_dir else None, seed=setup.seed,
                      time_dilation=setup.time_dilation, timeout_s=setup.timeout_s,
                      cpu_slice_ms=setup.cpu_slice_ms if setup.cpu_slice_ms is not None else DEFAULT_SLICE_MS,
                      capabilities=setup.machine, pace_compute=setup.pace_compute,
                      network_core=setup.network_core)
        backend.log = setup.log
        return backend

    def start_nodes(self, n_nodes: int) -> list[NodeAddress]:
        from testbed.net.emulation import Emulation

        n_hosts = len(self.topology.hosts)
        check(isinstance(n_nodes, int) and 1 <= n_nodes <= n_hosts, "n_nodes", n_nodes,
              f"an integer in 1..{n_hosts} (one node per host of topology {self.topology.name!r})")
        check(self.emulation is None, "n_nodes", n_nodes, "one start() per backend (close() it first)")
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="testbed-mininet-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        f = self.time_dilation
        self.emulation = Emulation(self.topology.dilated(f), self.requested_mechanism, seed=self.seed,
                                   cpu_slice_ms=self.cpu_slice_ms,
                                   tcp_rto_min_ms=LINUX_RTO_MIN_MS * f if f != 1 else None,
                                   capabilities=self.capabilities,
                                   network_cpu=host_cpus()[0] if self.network_core else None)
        try:
            self.log(f"building the emulated network ({n_hosts} hosts, topology {self.topology.name})")
            self.emulation.start()
            self.mechanism = self.emulation.mechanism
            self.hosts = self.topology.host_names[:n_nodes]
            self.log(f"starting {n_nodes} node servers in their hosts")
            self.procs = [self._spawn(h) for h in self.hosts]
            deadline = time.monotonic() + self.start_timeout_s * self.time_dilation  # nodes start at speed / F
            return [self._await_addresses(rank, deadline) for rank in range(n_nodes)]
        except BaseException:
            self.close()
            raise

    def _spawn(self, host: str) -> subprocess.Popen:
        em = self.emulation
        argv = [self.python, "-m", "testbed.node", "--listen", f"{em.data_ip(host)}:0",
                "--listen", f"{em.control_ip(host)}:0", "--watch-parent",
                "--insecure",  # plain gRPC on the emulated network's addresses (nobody else reaches them)
                "--keepalive-timeout-s", f"{KEEPALIVE_TIMEOUT_S * self.time_dilation:g}"]
        rate = self.cpu_rate(host) if self.pace_compute else None
        if rate is not None:
            argv += ["--pace-cpu", f"{rate:.6g}"]
        with open(self.log_path(host), "ab") as log:
            return em.popen(host, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)

    def cpu_rate(self, host: str) -> float | None:
        """CPU-seconds per second ``host``'s device cgroup allows (quota / period, as the kernel
        holds them); None: no quota (a device at host speed)."""
        cg = self.emulation.cgroups.get(host) if self.emulation is not None else None
        limit = cg.cpu_limit() if cg is not None else None
        return None if limit is None else limit[0] / limit[1]

    def _await_addresses(self, rank: int, deadline: float) -> NodeAddress:
        host, proc, em = self.hosts[rank], self.procs[rank], self.emulation
        lines = read_lines(proc, 2, deadline)
        addrs = ready_addresses(lines)
        data = next((a for a in addrs if a.startswith(em.data_ip(host) + ":")), None)
        control = next((a for a in addrs if a.startswith(em.control_ip(host) + ":")), None)
        if data is None or control is None:
            raise node_not_ready(f"node {rank} on host {host}", proc, lines, self.start_timeout_s, self.log_path(host))
        proc.stdout.close()
        return NodeAddress(control=control, data=data)

    def log_path(self, host: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"node-{host}.log"

    def client(self, addresses: list[NodeAddress], timeout_s: float, load_timeout_s: float | None = None):
        """The runner's handle on the nodes: deadlines in device time, results in device time."""
        from testbed.backends.dilation import DilatedClient

        return DilatedClient(addresses, self.time_dilation, timeout_s,
                             load_timeout_s if load_timeout_s is not None else max(300.0, timeout_s))

    # -- links ---------------------------------------------------------------------
    def apply_profile(self, profile: LinkProfile) -> None:
        """Map ``profile`` (device time) onto every link by its sweep mode and reshape live (see
        Topology.with_sweep)."""
        self._require_started()
        self.last_change_s = self.emulation.apply_profile(profile.dilated(self.time_dilation))
        self.profile = profile

    # -- faults (see Backend) ------------------------------------------------------
    def link_down(self, a: str, b: str) -> None:
        """Set one end of the link administratively down; its peer loses carrier, so neither direction
        carries a packet. A switch's end is chosen when there is one: a host keeps its routes and shaping."""
        self._link_state(a, b, "down")

    def link_up(self, a: str, b: str) -> None:
        self._link_state(a, b, "up")

    def _link_state(self, a: str, b: str, state: str) -> None:
        self._require_started()
        em, i = self.emulation, self._link_index(a, b)
        lk = self.topology.links[i]
        end = lk.b if lk.b not in self.topology.host_names else lk.a
        port = em.wiring.link_port(i, end)
        argv = em.ns_argv(port.ns)
        if port.ns and state == "down":  # a host's end: its routes through the device go with it
            out = subprocess.run(argv + ["ip", "-4", "-o", "route", "show", "dev", port.dev], check=True,
                                 capture_output=True, text=True).stdout
            self._routes[(i, end)] = [ln.replace(" linkdown", "").split() for ln in out.splitlines() if ln.strip()]
        subprocess.run(argv + ["ip", "link", "set", "dev", port.dev, state], check=True, capture_output=True)
        for route in self._routes.pop((i, end), []) if state == "up" else []:
            subprocess.run(argv + ["ip", "route", "replace", *route, "dev", port.dev], check=True, capture_output=True)

    def set_link_profile(self, a: str, b: str, fields: dict) -> None:
        """Both directions of the link: the current cell's profile with ``fields`` changed."""
        self._set_link(a, b, lambda p: replace(p, **fields))

    def restore_link(self, a: str, b: str) -> None:
        self._set_link(a, b, lambda p: p)

    def _set_link(self, a: str, b: str, change) -> None:
        self._require_started()
        lk = self.topology.with_sweep(self.profile).links[self._link_index(a, b)]
        f = self.time_dilation
        self.emulation.set_link(lk.a, lk.b, change(lk.a_to_b).dilated(f), change(lk.b_to_a).dilated(f))

    def _link_index(self, a: str, b: str) -> int:
        i = next((k for k, lk in enumerate(self.topology.links) if {lk.a, lk.b} == {a, b}), None)
        check(i is not None, "link", f"{a}-{b}", "a link of the topology")
        return i

    def replay(self, trace: BandwidthTrace, profile: LinkProfile | None = None, loop: bool = True) -> TraceReplay:
        """Replay ``trace`` (device time) on every swept link: at each step the sweep profile is
        ``profile`` with the trace's bandwidth. Stopped by stop_replays() or close()."""
        self._require_started()
        base, f = (profile or LinkProfile()).dilated(self.time_dilation), self.time_dilation
        if f != 1:  # F times slower: each step lasts F times as long at 1/F of the bandwidth
            trace = BandwidthTrace(tuple((t * f, bw / f) for t, bw in trace.points), trace.duration_s * f)

        def apply(bw: float) -> None:  # bw and base are dilated already
            self.emulation.apply_profile(replace(base, bandwidth_mbps=bw))

        replay = TraceReplay(trace, apply, loop).start()
        self.replays.append(replay)
        return replay

    def stop_replays(self) -> None:
        replays, self.replays = self.replays, []
        for r in replays:
            r.stop()

    def wire_bytes(self) -> int | None:
        return self.emulation.wire_bytes() if self.emulation is not None else None

    def retransmitted_segments(self) -> int | None:
        return self.emulation.retransmitted_segments() if self.emulation is not None else None

    def run_ids(self) -> list[str]:
        run = self.emulation.run if self.emulation is not None else None
        return [run.run_id] if run is not None else []

    def shaping_details(self) -> dict:
        em = self.emulation
        return {"delay_held": em.delay_points()} if em is not None and em.run is not None else {}

    def fidelity_table(self, seconds: float = 2.0) -> list[dict]:
        """Measure one host pair per distinct path profile (iperf3 + ping); rows as dicts.

        Under dilation the links are measured as they run (bandwidth / F, delay x F) and every
        figure is then given in device time (goodput x F, delays and RTTs / F); ratios and
        errors compare like with like. ``seconds`` of iperf3 are wall-clock seconds."""
        from dataclasses import asdict

        from testbed.net.fidelity import check_pair, distinct_pairs

        self._require_started()
        em, f = self.emulation, self.time_dilation
        rows = [asdict(check_pair(em, s, d, seconds)) for s, d in distinct_pairs(em.topology)]
        if f != 1:
            for row in rows:
                for k in ("bandwidth_mbps", "goodput_mbps"):
                    row[k] = row[k] * f if row.get(k) is not None else None
                for k in ("delay_ms", "rtt_expected_ms", "rtt_ms", "rtt_error_ms", "rtt_plain_expected_ms",
                          "rtt_plain_ms", "rtt_plain_error_ms"):
                    row[k] = row[k] / f if row.get(k) is not None else None
                row["time_dilation"] = f
        return rows

    def _require_started(self) -> None:
        if self.emulation is None or self.emulation.run is None:
            raise ConfigError("backend", "mininet (not started)", "start() before shaping or measuring")

    # -- teardown ------------------------------------------------------------------
    def close_nodes(self) -> None:
        """Stop replays and nodes, then remove the whole emulated network. Idempotent."""
        try:
            self.stop_replays()
        except Exception as e:  # noqa: BLE001 - teardown goes on; the replay error is reported
            print(f"testbed mininet: trace replay failed: {e}", file=sys.stderr)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout and not p.stdout.closed:
                p.stdout.close()
        self.procs = []
        if self.emulation is not None:
            self.emulation.close()
            self.emulation = None
        if self._own_logs and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None
