"""A live emulated network: a Topology built with Mininet, shaped with tc, torn down completely.

Built once per experiment; link profiles then change live (testbed.net.shaping). Mininet gives
the hosts (network namespaces, veth pairs, shells); switches are Linux bridges made with
iproute2 and no OpenFlow controller (no Open vSwitch here, and no bridge-utils needed). Every
host gets one data address (10.0.0.<i+1>) on all its data interfaces and a /32 route per peer
over the first hop of its path, so star, line and mesh all look the same to the nodes. An
unshaped control network (one bridge, 172.16-31.x.0/24 chosen per run) joins every host and
the root namespace, so the orchestrator never crosses a shaped link.

Teardown happens on close(), on leaving a ``with`` block, at interpreter exit (atexit), and on
SIGTERM/SIGHUP (turned into SystemExit so that with-blocks and atexit run). If the owner dies
without tearing down (SIGKILL), the run's keeper (testbed.net.keeper, started before anything
is built) kills every process the run started and removes its links and cgroups at once. And
every start first removes what dead runs left (the rules of `testbed clean`: only runs whose
owner is gone), saying so in one line on stderr. Under htb+nfqueue with switches, the run also
owns an iptables chain and a delay line in the root namespace and may set
net.bridge.bridge-nf-call-iptables (testbed.net.cleanup says who puts it back): the same
teardown, keeper and sweep remove them.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

from testbed.errors import check
from testbed.net import cleanup
from testbed.net.cgroups import DEFAULT_SLICE_MS, DeviceCgroup, allocate_cores, host_cpus
from testbed.net.delayline import DELAYLINE_RT_PRIORITY, DelayLineClient
from testbed.net.keeper import Keeper
from testbed.net.probe import Capabilities, probe
from testbed.net.profile import LinkProfile
from testbed.net.shaping import Shaper, Wiring
from testbed.net.tc import MECHANISMS
from testbed.net.topology import Topology



def _bridge_class():
    from mininet.node import Switch

    class IPBridge(Switch):
        """A Linux bridge made with iproute2 (Mininet's LinuxBridge needs brctl from bridge-utils)."""

        def start(self, _controllers) -> None:
            self.cmd(f"ip link add name {self.name} type bridge && ip link set dev {self.name} up")
            for intf in self.intfList():
                if self.name in intf.name:
                    self.cmd(f"ip link set dev {intf} master {self.name} up")

        def stop(self, deleteIntfs: bool = True) -> None:
            self.cmd(f"ip link del {self.name}")
            super().stop(deleteIntfs)

        def connected(self) -> bool:
            return True

    return IPBridge


class _SignalGuard:
    """Turns SIGTERM/SIGHUP into an exception (so with-blocks and atexit tear down) and closes at exit.

    A Python handler installed before the guard (a caller's own, which may record the signal and
    raise its own exception) is called instead of raising SystemExit: Python drops what a handler
    raises inside code whose exceptions it ignores (an at-fork hook such as logging's runs at every
    fork of a starting host), and only the caller's handler can note the signal for later."""

    def __init__(self, close):
        self.close, self.previous = close, {}
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self.previous[sig] = signal.signal(sig, self._raise)

    def _raise(self, signum, frame):
        previous = self.previous.get(signum)
        if callable(previous) and previous != self._raise:
            previous(signum, frame)
        raise SystemExit(128 + signum)

    def remove(self) -> None:
        atexit.unregister(self.close)
        for sig, prev in self.previous.items():
            if signal.getsignal(sig) == self._raise:
                signal.signal(sig, prev)
        self.previous = {}


class Emulation:
    """``with Emulation(load_topology("star")) as em: em.popen("h1", [...]); em.apply_profile(...)``."""

    def __init__(self, topology: Topology, mechanism: str = "auto", seed: int = 0,
                 cpu_slice_ms: float = DEFAULT_SLICE_MS, tcp_rto_min_ms: float | None = None,
                 capabilities: Capabilities | None = None, network_cpu: int | None = None):
        """``cpu_slice_ms``: CPU time per CFS period of each confined device core (testbed.net.cgroups).
        ``tcp_rto_min_ms``: minimum TCP retransmission timeout on every host-to-host route
        (None: the kernel's 200 ms). ``capabilities``: this machine's probe result, if the caller
        probed it already (the kernel is probed once per run, not at every start). ``network_cpu``: a
        host core kept for the network (None: none). The delay lines run on it, the receive processing
        of every emulated interface is steered to it (RPS) and no device is pinned to it. A kernel
        that does not account interrupt time apart charges the softirq work of packets to whatever
        task it interrupts; with the network on its own core, that is no device's compute."""
        check(mechanism in ("auto",) + MECHANISMS, "mechanism", mechanism, ", ".join(("auto",) + MECHANISMS))
        check(isinstance(cpu_slice_ms, (int, float)) and 0.5 <= cpu_slice_ms <= 1000, "cpu_slice_ms", cpu_slice_ms,
              "a number of milliseconds in [0.5, 1000]")
        check(tcp_rto_min_ms is None or (isinstance(tcp_rto_min_ms, (int, float)) and tcp_rto_min_ms >= 1),
              "tcp_rto_min_ms", tcp_rto_min_ms, "a number of milliseconds >= 1, or null")
        self.topology, self.requested, self.seed = topology, mechanism, seed
        self.cpu_slice_ms, self.tcp_rto_min_ms, self.capabilities = cpu_slice_ms, tcp_rto_min_ms, capabilities
        cpus = host_cpus()
        check(network_cpu is None or (network_cpu in cpus and len(cpus) >= 2), "network_cpu", network_cpu,
              f"one of this process's cores {cpus}, with another left for the devices, or None")
        self.network_cpu = network_cpu
        self.base_topology = topology  # what sweep profiles are mapped onto (fixed links keep theirs)
        self.mechanism = "none"
        self.net = None
        self.run: cleanup.Run | None = None
        self.delay_lines: dict[str, DelayLineClient] = {}
        self.cgroups: dict[str, DeviceCgroup] = {}
        self.procs: list[subprocess.Popen] = []
        self._intf: dict[tuple[int, str], str] = {}  # (link index, node) -> interface name
        self._ctl_intf: dict[str, str] = {}
        self._ctl_ports: list[str] = []  # the control switch's side of each host's control link
        self.wiring: Wiring | None = None  # what the shaper shapes, known once built
        self._closed = False
        self._guard: _SignalGuard | None = None
        self.keeper: Keeper | None = None
        self.swept = cleanup.Leftovers()  # what dead runs had left, removed by start()

    # -- names and addresses -------------------------------------------------
    def internal(self, name: str) -> str:
        """The Mininet/kernel name of a topology node (unique per run, recognisable by clean)."""
        assert self.run is not None
        hosts = self.topology.host_names
        if name in hosts:
            return self.run.name("h", hosts.index(name))
        return self.run.name("s", [s.name for s in self.topology.switches].index(name))

    def data_ip(self, host: str) -> str:
        return f"10.0.0.{self.topology.host_names.index(host) + 1}"

    def control_ip(self, host: str) -> str:
        return f"{self.control_net}.{self.topology.host_names.index(host) + 1}"

    def node(self, name: str):
        return self.net.get(self.internal(name))

    def ns_argv(self, node: str) -> list[str]:
        """Prefix that runs a command in ``node``'s namespace ("" or a switch: the root namespace)."""
        assert self.wiring is not None
        return self.wiring.ns_argv(node)

    def _wiring(self) -> Wiring:
        """The built network as the shaper sees it."""
        t, run = self.topology, self.run
        assert run is not None
        # delays held in the switches where bridged frames can pass iptables (br_netfilter), else by receivers
        switched = self.mechanism == "htb+nfqueue" and bool(t.switches) and cleanup.BRIDGE_NF.exists()
        return Wiring.of(t, self._intf, {h: self.node(h).pid for h in t.host_names},
                         {h: self.data_ip(h) for h in t.host_names},
                         {s.name: run.name("m", k) for k, s in enumerate(t.switches)},
                         chain=run.chain if switched else "", bridges=f"{run.name('s')}+" if switched else "",
                         queue_base=run.claim_queues(len(t.hosts) ** 2) if switched else 0)

    # -- life cycle -------------------------------------------------------------
    def start(self) -> "Emulation":
        self.mechanism = (self.capabilities or probe(full=False)).require(self.requested)
        self.swept = cleanup.clean()
        if not self.swept.empty():
            print(f"testbed.net: removed what dead emulation runs left: {self.swept.describe()}", file=sys.stderr)
        self.run = cleanup.Run.create(self.topology.name)
        self._guard = _SignalGuard(self.close)
        try:
            self.keeper = Keeper.start(self.run.run_id)
            self._build()
            self.wiring = self._wiring()
            if self.wiring.chain:
                cleanup.bridge_netfilter_on()
            self._configure_hosts()
            if self.network_cpu is not None:
                self._steer_receive_processing(self.network_cpu)
            self.shaper = Shaper(self.wiring, self.mechanism, self.spawn, self.delay_lines)
            self._start_delay_lines(list(self.shaper.wanted_rules(self.topology)))
            self.shaper.setup(self.topology)
            self._wire_base = self._wire_counters()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> "Emulation":
        return self.start() if self.run is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        from mininet.link import Link
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        from mininet.node import Host

        setLogLevel("error")  # Mininet narrates every step at "info"
        t = self.topology
        net = Mininet(topo=None, switch=_bridge_class(), controller=None, link=Link, host=Host,
                      build=False, autoSetMacs=False, autoStaticArp=False, waitConnected=False)
        self.net = net
        for h in t.hosts:
            net.addHost(self.internal(h.name), ip=None)
        for i, s in enumerate(t.switches):
            net.addSwitch(self.internal(s.name), dpid=f"{i + 1:016x}")
        for i, lk in enumerate(t.links):
            link = net.addLink(self.internal(lk.a), self.internal(lk.b))
            self._intf[(i, lk.a)], self._intf[(i, lk.b)] = link.intf1.name, link.intf2.name
        ctl = net.addSwitch(self.run.name("c"), dpid=f"{len(t.switches) + 1:016x}")
        for h in t.hosts:
            link = net.addLink(self.internal(h.name), ctl)
            self._ctl_intf[h.name] = link.intf1.name
            self._ctl_ports.append(link.intf2.name)
        net.build()
        net.start()

    def _configure_hosts(self) -> None:
        """Addresses, per-peer routes, no IPv6 chatter; device cgroups; control address for root."""
        t = self.topology
        self.control_net = _free_control_net()
        subprocess.run(["ip", "addr", "add", f"{self.control_net}.254/24", "dev", self.run.name("c")], check=True)
        cores = allocate_cores([h.device for h in t.hosts], [c for c in host_cpus() if c != self.network_cpu])
        rto = f" rto_min {self.tcp_rto_min_ms:g}ms" if self.tcp_rto_min_ms is not None else ""
        procs = []
        for i, h in enumerate(t.hosts):
            me = self.wiring.host(h.name)
            lines = [f"addr add {self.control_ip(h.name)}/24 dev {self._ctl_intf[h.name]}"]
            lines += [f"addr add {me.ip}/32 dev {dev}" for dev in me.devs]
            for peer in t.host_names:
                if peer != h.name:
                    lk, frm = t.path(h.name, peer)[0]
                    dev = self.wiring.link_port(t.links.index(lk), frm).dev
                    lines.append(f"route add {self.data_ip(peer)}/32 dev {dev} src {me.ip}{rto}")
            argv = self.ns_argv(h.name)
            subprocess.run(argv + ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                   "net.ipv6.conf.default.disable_ipv6=1"], check=True)
            procs.append(subprocess.Popen(argv + ["ip", "-batch", "-"], stdin=subprocess.PIPE, text=True))
            procs[-1].communicate("\n".join(lines) + "\n")
            if h.device.confined:
                cg = DeviceCgroup(self.internal(h.name), h.device, cores[i], self.cpu_slice_ms)
                self.cgroups[h.name] = cg
                cg.create()
                cg.join(self.node(h.name).pid)
        bad = [p.args for p in procs if p.returncode != 0]
        check(not bad, "topology", self.topology.name, f"addresses that the kernel accepts (failed: {bad})")

    def _steer_receive_processing(self, cpu: int) -> None:
        """Receive packet steering of every interface of this emulation to ``cpu``: the switches'
        ports, the control switch's included (root namespace), and everything in each host's
        namespace (whose interfaces show in a sysfs mounted inside it, in a mount namespace of its own)."""
        mask = f"{1 << cpu:x}"
        ours = {n for (_, node), n in self._intf.items() if node not in self.topology.host_names}
        ours |= set(self._ctl_ports)
        for q in (q for name in sorted(ours) for q in Path("/sys/class/net", name, "queues").glob("rx-*")):
            (q / "rps_cpus").write_text(mask)
        steer = f"for f in /sys/class/net/*/queues/rx-*/rps_cpus; do echo {mask} > $f; done"
        for h in self.topology.host_names:
            subprocess.run(["nsenter", "-t", str(self.node(h).pid), "-n", "--", "unshare", "-m", "sh", "-c",
                            f"mount -t sysfs sysfs /sys && {steer}"], check=True)

    def _start_delay_lines(self, namespaces: list[str]) -> None:
        """One delay line per namespace that holds paths: "" (root) for the switches, else a host."""
        hosts = self.topology.host_names
        for ns in namespaces:
            seed = self.seed + (hosts.index(ns) if ns else len(hosts))
            argv = [sys.executable, "-m", "testbed.net.delayline", "--seed", str(seed),
                    "--rt-priority", str(DELAYLINE_RT_PRIORITY)]
            if self.network_cpu is not None:
                argv = ["taskset", "-c", str(self.network_cpu)] + argv
            pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if ns:
                proc = self.popen(ns, argv, device=False, **pipes)
            else:
                proc = subprocess.Popen(argv, env=self.env(), cwd=_repo_root(), **pipes)
                self.procs.append(proc)
            self.delay_lines[ns] = DelayLineClient(proc, ns or "the root namespace")

    def delay_point(self, src: str, dst: str) -> str:
        """Where path ``src`` -> ``dst`` holds its delay: "sender" (netem), "switch" (every tool in
        the hosts sees it) or "receiver" (plain ping and tcpdump on ``dst`` do not); see testbed.net.tc."""
        return self.shaper.delay_point(self.topology, src, dst)

    def delay_points(self) -> dict[str, int]:
        """How many host-to-host paths hold their delay at each point (for the manifest)."""
        names, out = self.topology.host_names, {}
        for src in names:
            for dst in names:
                if src != dst:
                    k = self.delay_point(src, dst)
                    out[k] = out.get(k, 0) + 1
        return out

    def popen(self, host: str, argv: list[str], device: bool = True, **kwargs) -> subprocess.Popen:
        """Start a process in ``host``'s namespace; it dies with this process (the run's keeper kills it).

        ``device``: also confine it to the host's device profile (cgroup). Emulation machinery
        (delay lines) passes False: the network must not slow down with the device's CPU share.
        """
        cg = self.cgroups.get(host) if device else None
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = self.node(host).popen(argv, preexec_fn=cg.join if cg is not None else None,
                                     env=self.env(kwargs.pop("env", None)), cwd=kwargs.pop("cwd", _repo_root()),
                                     **kwargs)
        self.procs.append(proc)
        return proc

    def spawn(self, node: str, argv: list[str]) -> subprocess.Popen:
        """Emulation machinery in ``node``'s namespace ("" or a switch: root), outside any device
        cgroup, stdin/stdout piped (stderr joined to stdout), dying with this process."""
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if node in self.topology.host_names:
            return self.popen(node, argv, device=False, **pipes)
        proc = subprocess.Popen(argv, env=self.env(), **pipes)
        self.procs.append(proc)
        return proc

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with the run's label: a process started
        with it counts as the run's, for the keeper and `testbed clean`."""
        assert self.run is not None
        return {**(base if base is not None else os.environ), cleanup.ENV_TAG: self.run.run_id}

    # -- live changes -------------------------------------------------------------
    def apply(self, topology: Topology) -> float:
        """Reshape live to ``topology`` (same hosts, switches and links); returns seconds taken."""
        check([(lk.a, lk.b) for lk in topology.links] == [(lk.a, lk.b) for lk in self.topology.links]
              and topology.host_names == self.topology.host_names, "topology", topology.name,
              "the same hosts and links as the running emulation (only profiles may change)")
        seconds = self.shaper.apply(topology)
        self.topology = topology
        return seconds

    def apply_profile(self, profile: LinkProfile) -> float:
        """Map one sweep profile onto every link (Topology.with_sweep) and reshape live."""
        return self.apply(self.base_topology.with_sweep(profile))

    def set_link(self, a: str, b: str, a_to_b: LinkProfile | None = None, b_to_a: LinkProfile | None = None) -> float:
        """Change one link's profile(s) live (trace replay uses this)."""
        links = list(self.topology.links)
        i = next((k for k, lk in enumerate(links) if {lk.a, lk.b} == {a, b}), None)
        check(i is not None, "link", f"{a}-{b}", "a link of the topology")
        lk = links[i]
        fwd, rev = (a_to_b, b_to_a) if lk.a == a else (b_to_a, a_to_b)
        links[i] = replace(lk, a_to_b=fwd or lk.a_to_b, b_to_a=rev or lk.b_to_a)
        return self.apply(replace(self.topology, links=tuple(links)))

    # -- counters -------------------------------------------------------------------
    def _wire_counters(self) -> dict[str, int]:
        out = {}
        for h in self.wiring.hosts:
            devs = set(h.devs)
            for line in Path(f"/proc/{h.pid}/net/dev").read_text().splitlines()[2:]:
                name, rest = line.split(":", 1)
                if name.strip() in devs:
                    out[name.strip()] = int(rest.split()[8])  # transmit bytes
        return out

    def wire_bytes(self) -> int:
        """Bytes the hosts' data interfaces transmitted since start (frames as counted by the kernel)."""
        now = self._wire_counters()
        return sum(v - self._wire_base.get(k, 0) for k, v in now.items())

    def retransmitted_segments(self) -> int:
        """TCP segments the hosts retransmitted so far (a running counter: each host namespace's own
        RetransSegs, read from its /proc/PID/net/snmp without entering it)."""
        return sum(tcp_retransmits(Path(f"/proc/{h.pid}/net/snmp").read_text()) for h in self.wiring.hosts)

    def tcp_recoveries(self) -> dict[str, int]:
        """The hosts' TCP loss probes and retransmission timeouts so far (TcpExt of /proc/PID/net/netstat)."""
        out = {"TCPLossProbes": 0, "TCPTimeouts": 0}
        for h in self.wiring.hosts:
            ext = proc_counters(Path(f"/proc/{h.pid}/net/netstat").read_text(), "TcpExt")
            for k in out:
                out[k] += ext.get(k, 0)
        return out

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process, remove every namespace, link, qdisc, rule and cgroup. Idempotent."""
        if self._closed or self.run is None:
            return
        self._closed = True
        if getattr(self, "shaper", None) is not None:
            self.shaper.close()
        for dl in self.delay_lines.values():
            dl.close()
        for p in self.procs:
            cleanup.stop_process(p)
        if self.net is not None:
            try:
                self.net.stop()
            except Exception as e:  # noqa: BLE001 - the sweep below removes what stop() missed
                print(f"testbed.net: Mininet stop failed ({e}); cleaning by name", file=sys.stderr)
        for cg in self.cgroups.values():
            cg.remove()
        cleanup.clean(self.run.run_id)
        self.run.forget()
        if self.keeper is not None:
            self.keeper.release()
        if self._guard is not None:
            self._guard.remove()


def _free_control_net() -> str:
    """A 172.16.0.0/12 /24 that no route of the root namespace uses (runs may overlap in time)."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    rng = random.SystemRandom()
    while True:
        k = rng.randrange(16 * 256)
        net = f"172.{16 + k // 256}.{k % 256}"
        if f"{net}.0/24" not in used:
            return net


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def proc_counters(text: str, section: str) -> dict[str, int]:
    """One section of /proc/net/snmp or /proc/net/netstat text (two "<section>:" lines: names, then
    values) as a dict; empty if the text has no such section."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith(f"{section}:")]
    return {k: int(v) for k, v in zip(rows[0], rows[1])} if len(rows) >= 2 else {}


def tcp_retransmits(snmp: str) -> int:
    """RetransSegs from the text of /proc/net/snmp."""
    tcp = proc_counters(snmp, "Tcp")
    if "RetransSegs" not in tcp:
        raise ValueError("no Tcp RetransSegs in this /proc/net/snmp text")
    return tcp["RetransSegs"]
