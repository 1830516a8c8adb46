"""Applies a Topology's link profiles to a live emulation, and changes them live.

The shaper keeps what it installed (egress profile per interface, GSO size per host, path
rules per namespace) and on every ``apply(topology)`` issues only the commands for what
differs: ``tc class change`` / ``tc qdisc change`` on a running link (through the namespace's
long-running tc batch, testbed.net.batch), ``ip link set ... gso_max_size``, one atomic
iptables-restore per namespace whose loss or delay set changed (the root namespace for the
paths that cross a switch, the receiving host for direct links: see testbed.net.tc), one JSON
line per delay line. All namespaces get their part at once; then the answers are collected. A
bandwidth or delay change of a whole 4-host star costs a few milliseconds (loss changes spawn
iptables).

The shaper knows the network only as a ``Wiring``: interface names, namespaces and addresses,
which the emulation describes once it has built the network.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from testbed.net.batch import Batch, BatchError
from testbed.net.delayline import DelayLineClient
from testbed.net.profile import LinkProfile
from testbed.net.tc import (IPT, SourceRule, delayline_config, egress_commands, gso_max_bytes, medium_commands,
                            queue_limit_bytes, receiver_rules, switch_rules)
from testbed.net.topology import Topology


@dataclass(frozen=True)
class Port:
    """One shaped egress: an interface (or a medium's IFB), the namespace it lives in, what it carries."""

    ns: str  # host whose namespace holds it, or "" for the root namespace (switch ports, IFBs)
    dev: str
    link: int | None  # index in Topology.links of the link it sends on; None for an IFB
    frm: str  # the node this link direction leaves; for an IFB, its switch
    ingress: tuple[str, ...] = ()  # IFB only: the switch ports whose arriving frames it carries


@dataclass(frozen=True)
class HostPorts:
    """One host as the shaper sees it."""

    name: str
    pid: int  # a process in the host's network namespace
    ip: str  # its data address
    devs: tuple[str, ...]  # its data interfaces, one per link


@dataclass(frozen=True)
class Wiring:
    """Where a built network's shaping goes (names only; the emulation builds it once started)."""

    hosts: tuple[HostPorts, ...]
    egress: tuple[Port, ...]  # one per link direction
    mediums: tuple[Port, ...] = ()  # one IFB per shared-medium switch
    # htb+nfqueue in the switches (root namespace); chain "": every path held by its receiver
    chain: str = ""  # the run's iptables chain, hooked from FORWARD
    bridges: str = ""  # interface pattern matching the run's data bridges
    queue_base: int = 0  # the run's block of root NFQUEUE numbers (queues are per namespace)

    @classmethod
    def of(cls, topo: Topology, intf: Mapping[tuple[int, str], str], pids: Mapping[str, int],
           ips: Mapping[str, str], ifbs: Mapping[str, str], chain: str = "", bridges: str = "",
           queue_base: int = 0) -> "Wiring":
        """The wiring of ``topo`` built with interface ``intf[(link index, node)]``, host namespaces
        holding ``pids[host]``, data addresses ``ips[host]`` and IFB ``ifbs[switch]`` per medium;
        ``chain``, ``bridges`` and ``queue_base`` as above."""
        def devs(node: str) -> tuple[str, ...]:
            return tuple(dev for (_i, n), dev in intf.items() if n == node)

        names = topo.host_names
        return cls(tuple(HostPorts(h, pids[h], ips[h], devs(h)) for h in names),
                   tuple(Port(frm if frm in names else "", dev, i, frm) for (i, frm), dev in intf.items()),
                   tuple(Port("", ifbs[sw.name], None, sw.name, devs(sw.name))
                         for sw in topo.switches if sw.medium is not None), chain, bridges, queue_base)

    def host(self, name: str) -> HostPorts:
        return next(h for h in self.hosts if h.name == name)

    def link_port(self, link: int, frm: str) -> Port:
        """The interface that carries link number ``link`` in the direction leaving ``frm``."""
        return next(p for p in self.egress if p.link == link and p.frm == frm)

    def medium(self, switch: str) -> Port:
        return next(p for p in self.mediums if p.frm == switch)

    def ns_argv(self, ns: str) -> list[str]:
        """Prefix that runs a command in host ``ns``'s namespace (anything else: the root namespace)."""
        pid = next((h.pid for h in self.hosts if h.name == ns), None)
        return [] if pid is None else ["mnexec", "-a", str(pid)]


class ShapingError(RuntimeError):
    """A tc / iptables command was refused; the message has the command and the kernel's reply."""


class Shaper:
    """Shapes the ports of ``wiring`` with ``mechanism``.

    ``spawn(ns, argv)`` starts the long-running tc/ip batches in namespace ``ns`` ("" for root)
    with stdin/stdout piped; ``delay_lines`` are the delay lines (htb+nfqueue) by namespace: ""
    (root) for the paths held in the switches, a host's name for the direct links it receives on
    (``wanted_rules`` says which namespaces need one).
    """

    def __init__(self, wiring: Wiring, mechanism: str, spawn: Callable[[str, list[str]], subprocess.Popen],
                 delay_lines: Mapping[str, DelayLineClient]):
        self.wiring, self.mechanism = wiring, mechanism
        self.spawn, self.delay_lines = spawn, delay_lines
        self.egress: dict[Port, tuple[LinkProfile, float]] = {}  # installed (profile, rtt_ms)
        self.rules: dict[str, list[SourceRule]] = {}
        self.gso: dict[str, int] = {}  # host -> gso_max_size of its data interfaces
        self.lock = threading.Lock()
        self.batches: dict[tuple[str, str], Batch] = {}  # (namespace or "" for root, tool) -> running batch
        self.last_change_s: float | None = None

    # -- what a topology wants ---------------------------------------------
    def wanted_egress(self, topo: Topology) -> dict[Port, tuple[LinkProfile, float]]:
        """Port -> (profile, longest round trip in ms crossing it, for queue sizing)."""
        rtt: dict[Port, float] = {}
        names = topo.host_names
        for src in names:
            for dst in names:
                if src == dst:
                    continue
                r = topo.path_effect(src, dst).rtt_ms
                for lk, frm in topo.path(src, dst):
                    p = self.wiring.link_port(topo.links.index(lk), frm)
                    rtt[p] = max(rtt.get(p, 0.0), r)
                    to = lk.b if frm == lk.a else lk.a
                    if (sw := topo.switch(to)) is not None and sw.medium is not None:
                        m = self.wiring.medium(to)
                        rtt[m] = max(rtt.get(m, 0.0), r)
        out: dict[Port, tuple[LinkProfile, float]] = {}
        for i, lk in enumerate(topo.links):
            for frm in (lk.a, lk.b):
                p = self.wiring.link_port(i, frm)
                out[p] = (lk.profile_from(frm), rtt.get(p, 0.0))
        for sw in topo.switches:
            if sw.medium is not None:
                p = self.wiring.medium(sw.name)
                out[p] = (sw.medium, rtt.get(p, 0.0))
        return out

    def wanted_gso(self, topo: Topology) -> dict[str, int]:
        """Host -> GSO packet size: 1 ms of its narrowest outgoing path (see testbed.net.tc)."""
        out = {}
        for h in topo.host_names:
            bws = [topo.one_way(h, p).bandwidth_mbps for p in topo.host_names if p != h]
            shaped = [b for b in bws if b is not None]
            out[h] = gso_max_bytes(min(shaped) if shaped else None)
        return out

    def wanted_rules(self, topo: Topology) -> dict[str, list[SourceRule]]:
        """Namespace ("": root) -> its rule per path it holds (htb+nfqueue only). Which
        namespaces appear depends on the topology's structure, never on its profiles."""
        if self.mechanism != "htb+nfqueue":
            return {}
        names = topo.host_names
        out: dict[str, list[SourceRule]] = {}
        for d, dst in enumerate(names):
            for s, src in enumerate(names):
                if src == dst:
                    continue
                eff = topo.one_way(src, dst)
                rule = SourceRule(self.wiring.host(src).ip, s, eff.delay_ms, eff.jitter_ms, eff.loss_pct)
                if self._held_in_switch(topo, src, dst):
                    lk, frm = topo.path(src, dst)[-1]
                    port = self.wiring.link_port(topo.links.index(lk), frm).dev
                    rule = replace(rule, queue_num=self.wiring.queue_base + s * len(names) + d, port=port)
                out.setdefault("" if rule.port else dst, []).append(rule)
        return out

    def _held_in_switch(self, topo: Topology, src: str, dst: str) -> bool:
        """The path's last hop leaves a switch, and this run holds delays there."""
        return bool(self.wiring.chain) and topo.switch(topo.path(src, dst)[-1][1]) is not None

    def delay_point(self, topo: Topology, src: str, dst: str) -> str:
        """Where the delay of path ``src`` -> ``dst`` is held: "sender" (netem on the egress
        qdiscs), "switch" (before the receiver's stack: every tool in the hosts sees it) or
        "receiver" (after the receiver's kernel timestamps: plain ping and tcpdump miss it)."""
        if self.mechanism != "htb+nfqueue":
            return "sender"
        return "switch" if self._held_in_switch(topo, src, dst) else "receiver"

    # -- applying ------------------------------------------------------------
    def setup(self, topo: Topology) -> None:
        """First shaping of a freshly built network (mediums' ingress redirects included)."""
        ip_lines, tc_lines = [], []
        for m in self.wiring.mediums:
            ip_lines += [f"link add {m.dev} type ifb", f"link set dev {m.dev} up"]
            tc_lines += [" ".join(c[1:]) for c in medium_commands(m.dev, list(m.ingress))]
        self._run_blocks({("", "ip"): ip_lines})
        self._run_blocks({("", "tc"): tc_lines})
        self.apply(topo, first=True)

    def apply(self, topo: Topology, first: bool = False) -> float:
        """Make the live network follow ``topo``; returns the seconds the change took."""
        with self.lock:
            t0 = time.perf_counter()
            egress, gso, rules = self.wanted_egress(topo), self.wanted_gso(topo), self.wanted_rules(topo)
            blocks = {**self._gso_blocks(gso, first), **self._tc_blocks(egress, first)}
            ipt = {h: self._rules_text(h, r, first) for h, r in rules.items()
                   if first or _rule_set(r) != _rule_set(self.rules.get(h, []))}
            delays = {h: delayline_config(r) for h, r in rules.items() if first or r != self.rules.get(h)}
            # everything starts at once; then the answers are collected
            for h, cfg in delays.items():
                self.delay_lines[h].send(cfg)
            # the root namespace is shared with other runs: wait for the xtables lock there
            procs = [(_spawn(self.wiring.ns_argv(h) + [f"{IPT}-restore", "--noflush"] + ([] if h else ["-w"]),
                             text), text, h or "root") for h, text in ipt.items()]
            self._run_blocks(blocks)
            for h in delays:
                self.delay_lines[h].wait_ok()
            _wait_all(procs)
            self.egress, self.gso, self.rules = egress, gso, rules
            self.last_change_s = time.perf_counter() - t0
            return self.last_change_s

    def _rules_text(self, ns: str, rules: list[SourceRule], first: bool) -> str:
        if ns:
            return receiver_rules(rules, first=first)
        return switch_rules(self.wiring.chain, self.wiring.bridges, rules, first=first)

    def _tc_blocks(self, egress: dict[Port, tuple[LinkProfile, float]], first: bool) -> dict:
        """(namespace, "tc") -> tc batch lines for every egress whose qdiscs must change."""
        lines: dict[str, list[str]] = {}
        for port, (prof, rtt) in egress.items():
            old = None if first else self.egress.get(port)
            if old is None or self._tc_view(*old) != self._tc_view(prof, rtt):
                cmds = egress_commands(port.dev, prof, self.mechanism, rtt, old=old[0] if old else None)
                lines.setdefault(port.ns, []).extend(" ".join(c[1:]) for c in cmds)
        return {(ns, "tc"): ls for ns, ls in lines.items()}

    def _gso_blocks(self, gso: dict[str, int], first: bool) -> dict:
        return {(h, "ip"): [f"link set dev {dev} gso_max_size {n}" for dev in self.wiring.host(h).devs]
                for h, n in gso.items() if first or self.gso.get(h) != n}

    def _tc_view(self, prof: LinkProfile, rtt_ms: float) -> tuple:
        """What of a profile the egress qdiscs implement (under nfqueue, delay and loss live elsewhere)."""
        if self.mechanism == "htb+nfqueue":
            return prof.bandwidth_mbps, queue_limit_bytes(prof, rtt_ms)
        return prof, queue_limit_bytes(prof, rtt_ms)

    def _run_blocks(self, blocks: dict[tuple[str, str], list[str]]) -> None:
        """Send every namespace its block at once, then collect the answers."""
        sent = []
        for (ns, tool), lines in blocks.items():
            if lines:
                if (ns, tool) not in self.batches:
                    self.batches[(ns, tool)] = Batch(tool, lambda argv, n=ns: self.spawn(n, argv), ns or "root")
                sent.append((self.batches[(ns, tool)], self.batches[(ns, tool)].send(lines)))
        errors = []
        for batch, marker in sent:
            try:
                batch.wait(marker)
            except BatchError as e:
                errors.append(str(e))
        if errors:
            raise ShapingError("\n".join(errors))

    def close(self) -> None:
        for b in self.batches.values():
            b.close()
        self.batches = {}


def _rule_set(rules: list[SourceRule]) -> list[tuple]:
    """The part of a namespace's rules that lives in iptables (delay values live in the delay line)."""
    return [(r.src_ip, r.queue_num, r.delayed, r.loss_pct, r.port) for r in rules]


def _spawn(argv: list[str], stdin_text: str) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert p.stdin is not None
    p.stdin.write(stdin_text)
    p.stdin.close()
    return p


def _wait_all(procs: list[tuple[subprocess.Popen, str, str]]) -> None:
    errors = []
    for p, text, where in procs:
        assert p.stderr is not None
        err = p.stderr.read()
        p.wait()
        if p.returncode != 0:
            errors.append(f"{' '.join(p.args)} in {where} failed ({err.strip()}); input:\n{text}")
    if errors:
        raise ShapingError("\n".join(errors))
