"""Applies a Topology's link profiles to a live emulation, and changes them live.

The shaper keeps what it installed (egress profile per interface, source rules per receiving
host) and on every ``apply(topology)`` issues only the commands for what differs: ``tc class
change`` / ``tc qdisc change`` on a running link, one atomic iptables-restore per receiving host
whose loss or delay set changed, one JSON line per delay line. All commands of one change run at
once, one process per namespace (``tc -batch``, ``iptables-legacy-restore``), so a change of a
whole star costs a few process start-ups, not one per command.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from testbed.net.profile import LinkProfile
from testbed.net.tc import (IPT, SourceRule, delayline_config, egress_commands, gso_max_bytes, medium_commands,
                            queue_limit_bytes, receiver_rules)
from testbed.net.topology import Topology

if TYPE_CHECKING:
    from testbed.net.emulation import Emulation


@dataclass(frozen=True)
class Port:
    """One shaped egress: an interface (or a medium's IFB) and the namespace it lives in."""

    node: str  # topology name of the node owning it, or "" for the root namespace
    dev: str


class ShapingError(RuntimeError):
    """A tc / iptables command was refused; the message has the command and the kernel's reply."""


class Shaper:
    def __init__(self, emulation: "Emulation"):
        self.em = emulation
        self.mechanism = emulation.mechanism
        self.egress: dict[Port, tuple[LinkProfile, float]] = {}  # installed (profile, rtt_ms)
        self.rules: dict[str, list[SourceRule]] = {}
        self.gso: dict[str, int] = {}  # host -> gso_max_size of its data interfaces
        self.lock = threading.Lock()
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
                    p = self.em.egress_port(topo, lk, frm)
                    rtt[p] = max(rtt.get(p, 0.0), r)
                    to = lk.b if frm == lk.a else lk.a
                    if (sw := topo.switch(to)) is not None and sw.medium is not None:
                        m = self.em.medium_port(to)
                        rtt[m] = max(rtt.get(m, 0.0), r)
        out: dict[Port, tuple[LinkProfile, float]] = {}
        for lk in topo.links:
            for frm in (lk.a, lk.b):
                p = self.em.egress_port(topo, lk, frm)
                out[p] = (lk.profile_from(frm), rtt.get(p, 0.0))
        for sw in topo.switches:
            if sw.medium is not None:
                p = self.em.medium_port(sw.name)
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
        """Receiving host -> what it does to each source (htb+nfqueue only)."""
        if self.mechanism != "htb+nfqueue":
            return {}
        names = topo.host_names
        out = {}
        for dst in names:
            rules = []
            for q, src in enumerate(names):
                if src != dst:
                    eff = topo.one_way(src, dst)
                    rules.append(SourceRule(self.em.data_ip(src), q, eff.delay_ms, eff.jitter_ms, eff.loss_pct))
            out[dst] = rules
        return out

    # -- applying ------------------------------------------------------------
    def setup(self, topo: Topology) -> None:
        """First shaping of a freshly built network (mediums' ingress redirects included)."""
        jobs: dict[str, list[list[str]]] = {}
        for sw in topo.switches:
            if sw.medium is not None:
                ifb = self.em.medium_port(sw.name).dev
                subprocess.run(["ip", "link", "add", ifb, "type", "ifb"], check=True, capture_output=True)
                subprocess.run(["ip", "link", "set", "dev", ifb, "up"], check=True, capture_output=True)
                jobs.setdefault("", []).extend(medium_commands(ifb, self.em.switch_ports(sw.name)))
        self._run_tc(jobs)
        self.apply(topo, first=True)

    def apply(self, topo: Topology, first: bool = False) -> float:
        """Make the live network follow ``topo``; returns the seconds the change took."""
        with self.lock:
            t0 = time.perf_counter()
            tc_jobs: dict[str, list[list[str]]] = {}
            wanted = self.wanted_egress(topo)
            for port, (prof, rtt) in wanted.items():
                old = None if first else self.egress.get(port)
                if old is None or self._tc_view(*old) != self._tc_view(prof, rtt):
                    tc_jobs.setdefault(port.node, []).extend(
                        egress_commands(port.dev, prof, self.mechanism, rtt, old=old[0] if old else None))
            gso = self.wanted_gso(topo)
            ip_jobs = {h: "".join(f"link set dev {dev} gso_max_size {n}\n" for dev in self.em.data_devs(h))
                       for h, n in gso.items() if first or self.gso.get(h) != n}
            rules = self.wanted_rules(topo)
            ipt_jobs = {h: receiver_rules(r, first=first) for h, r in rules.items()
                        if first or _rule_set(r) != _rule_set(self.rules.get(h, []))}
            lines = {h: delayline_config(r) for h, r in rules.items() if first or r != self.rules.get(h)}
            for h, cfg in lines.items():
                self.em.delay_lines[h].send(cfg)
            procs = [(_spawn(self._argv(h, ["ip", "-batch", "-"]), text), text, h) for h, text in ip_jobs.items()]
            procs += self._start_tc(tc_jobs) + self._start_ipt(ipt_jobs)
            for h in lines:
                self.em.delay_lines[h].wait_ok()
            _wait_all(procs)
            self.egress = wanted
            self.rules, self.gso = rules, gso
            self.last_change_s = time.perf_counter() - t0
            return self.last_change_s

    def _tc_view(self, prof: LinkProfile, rtt_ms: float) -> tuple:
        """What of a profile the egress qdiscs implement (under nfqueue, delay and loss live elsewhere)."""
        if self.mechanism == "htb+nfqueue":
            return prof.bandwidth_mbps, queue_limit_bytes(prof, rtt_ms)
        return prof, queue_limit_bytes(prof, rtt_ms)

    def _argv(self, node: str, cmd: list[str]) -> list[str]:
        return self.em.ns_argv(node) + cmd

    def _start_tc(self, jobs: dict[str, list[list[str]]]) -> list[tuple[subprocess.Popen, str, str]]:
        procs = []
        for node, cmds in jobs.items():
            if cmds:
                text = "".join(" ".join(c[1:]) + "\n" for c in cmds)
                procs.append((_spawn(self._argv(node, ["tc", "-batch", "-"]), text), text, node or "root"))
        return procs

    def _start_ipt(self, jobs: dict[str, str]) -> list[tuple[subprocess.Popen, str, str]]:
        return [(_spawn(self._argv(h, [f"{IPT}-restore", "--noflush"]), text), text, h) for h, text in jobs.items()]

    def _run_tc(self, jobs: dict[str, list[list[str]]]) -> None:
        _wait_all(self._start_tc(jobs))


def _rule_set(rules: list[SourceRule]) -> list[tuple]:
    """The part of a receiver's rules that lives in iptables (delay values live in the delay line)."""
    return [(r.src_ip, r.queue_num, r.delayed, r.loss_pct) for r in rules]


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
