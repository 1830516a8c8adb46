"""A node that shapes its own links, inside its own network namespace (a real device, a container).

The Mininet shaper (testbed.net.shaping) shapes every host from the root namespace. A node on a
real device or in a pod has no such outside: it gets a Shape request (protos/node.proto) with
one entry per peer and shapes its own side of each link, with the same profile-to-commands
functions (testbed.net.tc) and the same delay line (testbed.net.delayline):

- what it SENDS to a peer: the bandwidth and queue of that direction, an htb class per peer
  classified by a u32 filter on the peer's address, on the interface that routes to the peer
  (``tc.peer_commands``; frames to anybody else, the orchestrator included, pass unshaped), and
  the interface's GSO size cut to 1 ms of its narrowest class, as the Mininet hosts get;
- what it RECEIVES from a peer: the delay, jitter and loss of that direction, held on receive
  like a Mininet host holds a direct link (never on the sender: TCP small queues), by
  - ``htb+nfqueue`` (kernels without netem, like ours): the INPUT hook jumps to this node's own
    chain ``TBSELF-<pid>`` (so several nodes in one namespace never collide), which drops by
    iptables' statistic match and queues each peer on its own NFQUEUE number of a delay line the
    node starts (``tc.receiver_rules(own=True)``: hooked first, ``--queue-bypass``);
  - ``htb+netem`` (where the kernel has netem, and IFB): the interface's ingress redirects each
    peer's packets to the node's IFB ``tbself<pid>``, where a per-source class with a netem
    leaf holds them (``tc.ingress_redirect_commands`` + ``tc.peer_commands(match="src",
    leaf="netem")``). The probe picks the mechanism as testbed.net.probe does: netem first.

So each direction of a pair is shaped once: the sender shapes its bandwidth, the receiver holds
its delay and loss. That is why a node's ShapeRequest carries per peer its *share* of the link
(``node_shares``): bandwidth and queue of node -> peer, delay, jitter and loss of peer -> node.
The orchestrator computes the shares from every rank's outgoing profiles
(``Orchestrator.shape``); ``topology_links`` gives those from a topology.

Live changes touch only what differs (``tc class change`` through a long-running tc batch, one
atomic iptables-restore of the chain, one line to the delay line). The node removes every qdisc,
IFB, iptables rule and chain and its delay line, and puts the GSO sizes back, on an empty Shape,
on Shutdown and when it stops (SIGTERM/SIGINT); a Shape that drops peers removes theirs. A node
killed outright (SIGKILL) is cleaned up by its guard: a small process in the same namespace that
undoes the last installed record when the node's pipe to it closes without ``done``. And
``testbed clean`` finds the record (/run/testbed-net/self-<pid>.json, where writable) of a node
that died with its guard, enters the namespace if it still exists and undoes it there.

Without CAP_NET_ADMIN (effective capabilities, testbed.net.probe.has_net_admin) a Shape with
anything to shape is refused (``NoNetAdmin``); an empty or all-unshaped one is accepted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import string
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from testbed.errors import TestbedError, check
from testbed.net.batch import Batch
from testbed.net.cleanup import REGISTRY_DIR, _start_time
from testbed.net.delayline import DELAYLINE_RT_PRIORITY, DelayLineClient
from testbed.net.profile import LinkProfile
from testbed.net.tc import (FRAME_BYTES, IPT, MAX_MINOR, PeerClass, SourceRule, delayline_config, gso_max_bytes,
                            ingress_redirect_commands, peer_commands, queue_limit_bytes, receiver_rules)

log = logging.getLogger("testbed.net.selfshape")

NO_NET_ADMIN = "this node has no CAP_NET_ADMIN: start it as root or with NET_ADMIN to shape its links"
CHAIN_PREFIX = "TBSELF-"  # + the node's pid: its iptables chain, hooked from INPUT
IFB_PREFIX = "tbself"  # + the node's pid: its IFB (htb+netem only)
REGISTRY_GLOB = "self-*.json"
QUEUE_BLOCK = MAX_MINOR + 1  # NFQUEUE numbers per node: block * QUEUE_BLOCK + class minor
QUEUE_BLOCKS = 65536 // QUEUE_BLOCK - 1  # block 0 is left to the Mininet runs' root-namespace queues
GUARD_DONE = "done"


class NoNetAdmin(TestbedError):
    """The node lacks CAP_NET_ADMIN and was asked to shape something."""

    def __init__(self) -> None:
        super().__init__(NO_NET_ADMIN)


class SelfShapeError(TestbedError, RuntimeError):
    """A tc / ip / iptables command of the node was refused; the message has it and the kernel's reply."""


# -- what each node applies --------------------------------------------------------------------

def node_shares(links_by_rank: list[Mapping[str, LinkProfile]], hosts: list[str]) -> list[dict[str, LinkProfile]]:
    """Each rank's ShapeRequest, from ``links_by_rank[r][peer host]`` = the profile of the direction
    rank r -> that peer, ``hosts[r]`` being rank r's data host.

    Rank r's share of its link with peer p: bandwidth and queue of r -> p (r's egress holds that
    queue), delay, jitter and loss of p -> r (r holds them on receive). The queue is pinned in
    packets from the round trip r -> p -> r, which only the orchestrator knows whole: the
    bandwidth-delay product as the Mininet shaper sizes it (``tc.queue_limit_bytes``).
    A peer whose both directions are unshaped gets an unshaped entry (removing what was there).
    """
    n = len(hosts)
    check(len(links_by_rank) == n, "links_by_rank", len(links_by_rank), f"one mapping per rank ({n})")
    for r, links in enumerate(links_by_rank):
        for peer, prof in links.items():
            check(peer in hosts and peer != hosts[r], f"links_by_rank[{r}]", peer,
                  f"the data host of another rank ({', '.join(h for h in hosts if h != hosts[r])})")
            check(isinstance(prof, LinkProfile), f"links_by_rank[{r}][{peer!r}]", prof, "a LinkProfile")
    if any(links for links in links_by_rank):
        check(len(set(hosts)) == n, "data hosts", hosts, "one distinct address per rank (links are shaped per address)")
    out: list[dict[str, LinkProfile]] = []
    for r, host in enumerate(hosts):
        share: dict[str, LinkProfile] = {}
        for q, peer in enumerate(hosts):
            if q == r or (peer not in links_by_rank[r] and host not in links_by_rank[q]):
                continue
            fwd, back = links_by_rank[r].get(peer, LinkProfile()), links_by_rank[q].get(host, LinkProfile())
            queue = fwd.queue_packets
            if fwd.bandwidth_mbps is not None and queue is None:
                queue = math.ceil(queue_limit_bytes(fwd, fwd.delay_ms + back.delay_ms) / FRAME_BYTES)
            share[peer] = LinkProfile(bandwidth_mbps=fwd.bandwidth_mbps, delay_ms=back.delay_ms,
                                      jitter_ms=back.jitter_ms, loss_pct=back.loss_pct,
                                      queue_packets=queue if fwd.bandwidth_mbps is not None else None)
        out.append(share)
    return out


def topology_links(topology, hosts: Mapping[str, str]) -> list[dict[str, LinkProfile]]:
    """``links_by_rank`` for ``Orchestrator.shape`` from a topology whose host ``h`` is reached at
    data host ``hosts[h]`` (rank order = ``hosts``' order): each ordered pair's one-way path
    (delays added, losses compounded, the narrowest bandwidth; testbed.net.topology)."""
    names = list(hosts)
    out = []
    for src in names:
        row = {}
        for dst in names:
            if dst != src:
                eff = topology.one_way(src, dst)
                row[hosts[dst]] = LinkProfile(bandwidth_mbps=eff.bandwidth_mbps, delay_ms=eff.delay_ms,
                                              jitter_ms=min(eff.jitter_ms, eff.delay_ms), loss_pct=eff.loss_pct)
        out.append(row)
    return out


def describe(links: Mapping[str, LinkProfile]) -> str:
    """One line per Shape for the node's log: what it sends and what it holds, per peer."""
    parts = []
    for peer, p in sorted(links.items()):
        if not p.shaped:
            parts.append(f"{peer}: unshaped")
            continue
        out = f"out {p.bandwidth_mbps:g} Mbit/s" if p.bandwidth_mbps is not None else "out unshaped"
        if p.bandwidth_mbps is not None and p.queue_packets is not None:
            out += f" queue {p.queue_packets} pkts"
        held = f"in {p.delay_ms:g} ms" + (f" +/- {p.jitter_ms:g}" if p.jitter_ms else "") + \
            (f" loss {p.loss_pct:g}%" if p.loss_pct else "")
        parts.append(f"{peer}: {out}, {held}")
    return "; ".join(parts)


# -- undoing ----------------------------------------------------------------------------------

@dataclass
class Record:
    """What a node installed, enough to undo it without the node (its guard, `testbed clean`)."""

    chain: str | None = None  # hooked from INPUT
    devs: dict[str, int] = field(default_factory=dict)  # shaped egress -> its GSO size before
    ingress: list[str] = field(default_factory=list)  # devices with an ingress qdisc (htb+netem)
    ifb: str | None = None

    def empty(self) -> bool:
        return not (self.chain or self.devs or self.ingress or self.ifb)

    def to_json(self) -> str:
        return json.dumps({"chain": self.chain, "devs": self.devs, "ingress": self.ingress, "ifb": self.ifb})

    @classmethod
    def from_json(cls, text: str) -> "Record":
        d = json.loads(text)
        return cls(d.get("chain"), {k: int(v) for k, v in d.get("devs", {}).items()}, list(d.get("ingress", [])),
                   d.get("ifb"))


def unhook_commands(rec: Record) -> list[list[str]]:
    """argv lists that take the node's chain out of INPUT and delete it."""
    if not rec.chain:
        return []
    return [[IPT, "-w", "-D", "INPUT", "-j", rec.chain], [IPT, "-w", "-F", rec.chain], [IPT, "-w", "-X", rec.chain]]


def untc_commands(rec: Record) -> list[list[str]]:
    """argv lists that remove the node's qdiscs and IFB and put the GSO sizes back."""
    cmds = []
    for dev, gso in rec.devs.items():
        cmds.append(["tc", "qdisc", "del", "dev", dev, "root"])
        cmds.append(["ip", "link", "set", "dev", dev, "gso_max_size", str(gso)])
    cmds += [["tc", "qdisc", "del", "dev", dev, "ingress"] for dev in rec.ingress]
    if rec.ifb:
        cmds.append(["ip", "link", "del", rec.ifb])
    return cmds


def undo(rec: Record, prefix: list[str] | None = None) -> list[str]:
    """Run every undo command (``prefix``: e.g. nsenter into the node's namespace); the failures,
    one line each (an already missing rule or qdisc is not one)."""
    failed = []
    for argv in unhook_commands(rec) + untc_commands(rec):
        p = subprocess.run((prefix or []) + argv, capture_output=True, text=True)
        err = p.stderr.strip()
        if p.returncode != 0 and not _already_gone(err):
            failed.append(f"{' '.join(argv)}: {err}")
    return failed


def _already_gone(err: str) -> bool:
    return any(s in err for s in ("No such file", "does not exist", "Cannot find device", "Bad rule",
                                  "No chain/target/match", "Cannot delete qdisc with handle of zero",
                                  "Cannot find specified qdisc", "Invalid handle"))


# -- the shaper ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeResult:
    apply_s: float  # seconds the commands took (the first Shape's kernel probe not counted)
    mechanism: str  # "htb+nfqueue", "htb+netem", or "none" (nothing shaped)
    summary: str  # one line: what is applied now


class SelfShaper:
    """Shapes this process's network namespace for its peers; one per node server.

    ``mechanism``: "auto" (probe the kernel at the first Shape: netem where it and IFB exist,
    else nfqueue), "htb+nfqueue" or "htb+netem". ``tag``: what names this node's chain, IFB and
    registry file (default: the pid, with a letter for a second shaper in one process).
    """

    _made = 0  # shapers made in this process

    def __init__(self, mechanism: str = "auto", tag: str | int | None = None,
                 registry_dir: Path | None = REGISTRY_DIR):
        check(mechanism in ("auto", "htb+nfqueue", "htb+netem"), "shape mechanism", mechanism,
              "auto, htb+nfqueue, htb+netem")
        self.requested = mechanism
        self.mechanism: str | None = None if mechanism == "auto" else mechanism
        if tag is None:  # several node servers in one process (in-process backends) each get their own names
            k, SelfShaper._made = SelfShaper._made, SelfShaper._made + 1
            tag = f"{os.getpid()}" + (string.ascii_lowercase[(k - 1) % 26] if k else "")
        self.tag = str(tag)
        self.chain = f"{CHAIN_PREFIX}{self.tag}"
        self.ifb = f"{IFB_PREFIX}{self.tag}"
        self.registry = registry_dir / f"self-{self.tag}.json" if registry_dir is not None else None
        self.lock = threading.Lock()
        self.closed = False
        self.applied: dict[str, LinkProfile] = {}  # peer -> share, as installed
        self.routes: dict[str, str] = {}  # peer -> device routing to it
        self.minors: dict[str, int] = {}  # peer -> class minor (also its NFQUEUE offset and filter priority)
        self.egress: dict[str, dict[str, PeerClass]] = {}  # device -> peer -> its class
        self.gso: dict[str, int] = {}  # device -> GSO size set
        self.rules: list[SourceRule] = []  # nfqueue: the chain's content
        self.ingress: dict[str, dict[str, int]] = {}  # netem: device -> peer -> redirect priority
        self.held: dict[str, PeerClass] = {}  # netem: peer -> its class on the IFB
        self.record = Record()
        self.hooked = False  # the chain exists and INPUT jumps to it
        self.delay_line: DelayLineClient | None = None
        self.queue_base = 0
        self.batches: dict[str, Batch] = {}
        self.guard: subprocess.Popen | None = None
        self._saved = Record().to_json()  # what the guard and the registry know
        self.probe_s = 0.0

    # -- public ------------------------------------------------------------------------------
    def shape(self, links: Mapping[str, LinkProfile]) -> ShapeResult:
        """Make this namespace follow ``links`` (peer address -> this node's share); replaces the
        previous Shape. Raises NoNetAdmin, ConfigError (a peer that is no IPv4 address or not
        routed over an interface) or SelfShapeError (a command refused: what was there is removed)."""
        for peer in links:
            try:
                ok = isinstance(ipaddress.ip_address(peer), ipaddress.IPv4Address)
            except ValueError:
                ok = False
            check(ok, "links.peer", peer, "the peer's IPv4 data address")
        wanted = {p: prof for p, prof in links.items() if prof.shaped}
        with self.lock:
            if self.closed:
                raise SelfShapeError("the node is stopping; it shapes nothing more")
            t0 = time.perf_counter()
            if not wanted:
                self._remove()
                return ShapeResult(time.perf_counter() - t0, "none", "nothing shaped")
            if not _net_admin():
                raise NoNetAdmin()
            if self.mechanism is None:
                self.mechanism = self._probe()
            t0 = time.perf_counter()
            try:
                self._apply(wanted)
            except BaseException:
                self._remove()
                raise
            return ShapeResult(time.perf_counter() - t0, self.mechanism, describe(wanted))

    def close(self) -> None:
        """Remove everything and refuse later Shapes (the node is stopping). Idempotent."""
        with self.lock:
            self.closed = True
            self._remove()

    # -- probing and routes ----------------------------------------------------------------------
    def _probe(self) -> str:
        from testbed.net.probe import probe_node

        t0 = time.perf_counter()
        caps = probe_node()
        self.probe_s = time.perf_counter() - t0
        if caps.ok("htb") and caps.ok("netem") and caps.ok("ifb"):
            return "htb+netem"
        if caps.ok("htb") and caps.ok("nfqueue"):
            return "htb+nfqueue"
        why = "; ".join(f"{c.name}: {c.detail}" for c in caps.checks if not c.ok)
        raise SelfShapeError(f"this node cannot shape its links here ({why})")

    def _route(self, peers: list[str]) -> dict[str, str]:
        """Peer -> the device that routes to it (looked up once per peer, all in one ``ip`` call)."""
        new = [p for p in peers if p not in self.routes]
        if new:
            out = subprocess.run(["ip", "-o", "-4", "-batch", "-"], input="".join(f"route get {p}\n" for p in new),
                                 capture_output=True, text=True)
            found = {}
            for line in out.stdout.splitlines():
                m = re.match(r"^(?:local |broadcast )?(\S+) .*?\bdev (\S+)", line)
                if m:
                    found[m.group(1)] = m.group(2)
            for p in new:
                check(p in found, "links.peer", p, f"an address this node has a route to ({out.stderr.strip()})")
                check(found[p] != "lo", "links.peer", p, "another host's address (this one is routed over lo: "
                      "this node's own)")
                self.routes[p] = found[p]
        return {p: self.routes[p] for p in peers}

    # -- applying ---------------------------------------------------------------------------------
    def _apply(self, wanted: dict[str, LinkProfile]) -> None:
        routes = self._route(sorted(wanted))
        for p in list(self.minors):
            if p not in wanted:
                del self.minors[p]
        for p in sorted(wanted):
            if p not in self.minors:
                free = sorted(set(range(1, MAX_MINOR + 1)) - set(self.minors.values()))
                check(bool(free), "links", len(wanted), f"at most {MAX_MINOR} peers")
                self.minors[p] = free[0]
        egress: dict[str, dict[str, PeerClass]] = {}
        for p, prof in wanted.items():
            if prof.bandwidth_mbps is not None:
                egress.setdefault(routes[p], {})[p] = PeerClass(self.minors[p], prof, 2 * prof.delay_ms)
        gso = {dev: gso_max_bytes(min(pc.profile.bandwidth_mbps for pc in classes.values()))
               for dev, classes in egress.items()}
        for dev in list(self.gso):
            if dev not in gso:
                gso[dev] = self.record.devs[dev]  # no class left there: back to what it was
        held = {p: prof for p, prof in wanted.items() if prof.delay_ms or prof.jitter_ms or prof.loss_pct}

        # what could ever need undoing is recorded before it is made
        self.record.devs.update({dev: self.record.devs.get(dev) or _gso_of(dev) for dev in egress})
        if self.mechanism == "htb+nfqueue" and held:
            self.record.chain = self.chain
        if self.mechanism == "htb+netem" and held:
            self.record.ifb = self.ifb
            self.record.ingress = sorted(set(self.record.ingress) | {routes[p] for p in held})
        self._save_record()

        tc_lines = []
        for dev in sorted(set(egress) | set(self.egress)):
            tc_lines += [" ".join(c[1:]) for c in peer_commands(dev, egress.get(dev, {}), self.egress.get(dev))]
        ip_lines = [f"link set dev {dev} gso_max_size {n}" for dev, n in sorted(gso.items()) if self.gso.get(dev) != n]
        if self.mechanism == "htb+nfqueue":
            self._receive_nfqueue(held, tc_lines, ip_lines)
        else:
            self._receive_netem(held, routes, tc_lines, ip_lines)
        self.egress, self.applied = egress, dict(wanted)
        self.gso = {dev: n for dev, n in gso.items() if dev in egress}
        for dev in [d for d in self.record.devs if d not in egress]:
            del self.record.devs[dev]  # its root qdisc is gone and its GSO size is back
        self._save_record()

    def _receive_nfqueue(self, held: dict[str, LinkProfile], tc_lines: list[str], ip_lines: list[str]) -> None:
        if self.delay_line is None and any(prof.delay_ms or prof.jitter_ms for prof in held.values()):
            self._start_delay_line()
        rules = [SourceRule(p, self.queue_base + self.minors[p], prof.delay_ms, prof.jitter_ms, prof.loss_pct)
                 for p, prof in sorted(held.items())]
        config = delayline_config([r for r in rules if r.delayed])
        send = self.delay_line is not None and config != delayline_config([r for r in self.rules if r.delayed])
        if send:
            self.delay_line.send(config)
        ipt = None
        if _rule_view(rules) != _rule_view(self.rules):
            ipt = _spawn([f"{IPT}-restore", "--noflush", "-w"],
                         receiver_rules(rules, first=not self.hooked, chain=self.chain, own=True))
        self._run(tc_lines, ip_lines)
        if send:
            self.delay_line.wait_ok()
        if ipt is not None:
            _wait(ipt, f"{IPT}-restore")
            self.hooked = True
        self.rules = rules

    def _receive_netem(self, held: dict[str, LinkProfile], routes: dict[str, str], tc_lines: list[str],
                       ip_lines: list[str]) -> None:
        classes = {p: PeerClass(self.minors[p], LinkProfile(delay_ms=prof.delay_ms, jitter_ms=prof.jitter_ms,
                                                            loss_pct=prof.loss_pct), 2 * prof.delay_ms)
                   for p, prof in held.items()}
        ingress: dict[str, dict[str, int]] = {}
        for p in held:
            ingress.setdefault(routes[p], {})[p] = self.minors[p]
        if held and not self.held:
            self._run([], [f"link add {self.ifb} type ifb", f"link set dev {self.ifb} up"])
        tc_lines += [" ".join(c[1:]) for c in peer_commands(self.ifb, classes, self.held, match="src", leaf="netem")]
        for dev in sorted(set(ingress) | set(self.ingress)):
            tc_lines += [" ".join(c[1:]) for c in ingress_redirect_commands(dev, self.ifb, ingress.get(dev, {}),
                                                                             self.ingress.get(dev))]
        self._run(tc_lines, ip_lines)  # the IFB stays until everything is removed
        self.held, self.ingress = classes, ingress

    def _start_delay_line(self) -> None:
        """Start the delay line and claim a block of NFQUEUE numbers no other node in this namespace
        holds (each node binds its block's first number, which no class uses, as its claim)."""
        argv = [sys.executable, "-m", "testbed.net.delayline", "--rt-priority", str(DELAYLINE_RT_PRIORITY)]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=str(Path(__file__).resolve().parents[2]))
        client = DelayLineClient(proc, f"this node's namespace (pid {proc.pid})")
        first = zlib.crc32(self.tag.encode()) % QUEUE_BLOCKS
        for k in range(QUEUE_BLOCKS):
            base = (1 + (first + k) % QUEUE_BLOCKS) * QUEUE_BLOCK
            client.send({str(base): {"delay_ms": 0, "jitter_ms": 0}})
            try:
                client.wait_ok()
            except RuntimeError as e:
                if "busy" in str(e).lower():
                    continue
                client.close()
                raise SelfShapeError(f"the delay line could not bind NFQUEUE {base}: {e}") from None
            self.delay_line, self.queue_base = client, base
            return
        client.close()
        raise SelfShapeError("every NFQUEUE block of this namespace is held by other nodes")

    def _run(self, tc_lines: list[str], ip_lines: list[str]) -> None:
        """Both batches at once; then their answers."""
        sent = []
        for tool, lines in (("tc", tc_lines), ("ip", ip_lines)):
            if lines:
                if tool not in self.batches:
                    self.batches[tool] = Batch(tool, _piped, "this node's namespace")
                sent.append((self.batches[tool], self.batches[tool].send(lines)))
        errors = []
        for batch, marker in sent:
            try:
                batch.wait(marker)
            except RuntimeError as e:
                errors.append(str(e))
        if errors:
            raise SelfShapeError("; ".join(errors))

    # -- removing --------------------------------------------------------------------------------
    def _remove(self) -> None:
        """Unhook the chain (no packet is queued any more), let the delay line release what it
        holds, remove qdiscs and the IFB, put GSO sizes back; forget it all."""
        rec = self.record
        failed = []
        if rec.chain:
            failed += undo(Record(chain=rec.chain))
        if self.delay_line is not None:
            self.delay_line.close()
            self.delay_line = None
        for b in self.batches.values():
            b.close()
        self.batches = {}
        failed += undo(Record(devs=rec.devs, ingress=rec.ingress, ifb=rec.ifb))
        if failed:
            log.warning("removing this node's shaping: %s", "; ".join(failed))
        self.record, self.applied, self.routes, self.minors = Record(), {}, {}, {}
        self.egress, self.gso, self.rules, self.ingress, self.held = {}, {}, [], {}, {}
        self.hooked = False
        self._save_record()

    # -- the guard and the registry ---------------------------------------------------------------
    def _save_record(self) -> None:
        """Tell the guard (started with the first record) and the registry what to undo."""
        text = self.record.to_json()
        if text == self._saved:
            return
        self._saved = text
        if self.record.empty():
            if self.guard is not None:
                _guard_send(self.guard, GUARD_DONE)
                _close_guard(self.guard)
                self.guard = None
            if self.registry is not None:
                self.registry.unlink(missing_ok=True)
            return
        if self.guard is None:
            self.guard = subprocess.Popen([sys.executable, "-m", "testbed.net.selfshape", "guard"]
                                          + ([str(self.registry)] if self.registry is not None else []),
                                          stdin=subprocess.PIPE, text=True, start_new_session=True,
                                          cwd=str(Path(__file__).resolve().parents[2]))
        _guard_send(self.guard, text)
        if self.registry is not None:
            try:
                self.registry.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.registry.with_suffix(".tmp")
                tmp.write_text(json.dumps({"owner_pid": os.getpid(), "owner_start": _start_time(os.getpid()),
                                           "netns": _netns_inode("self"), "record": json.loads(text)}))
                os.replace(tmp, self.registry)
            except OSError:
                pass  # not root: the guard alone cleans up after a crash


def _net_admin() -> bool:
    from testbed.net.probe import has_net_admin

    return has_net_admin()


def _rule_view(rules: list[SourceRule]) -> list[tuple]:
    """What of the rules lives in iptables (the delay values live in the delay line)."""
    return [(r.src_ip, r.queue_num, r.delayed, r.loss_pct) for r in rules]


def _piped(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _spawn(argv: list[str], text: str) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert p.stdin is not None
    p.stdin.write(text)
    p.stdin.close()
    return p


def _wait(p: subprocess.Popen, what: str) -> None:
    assert p.stderr is not None
    err = p.stderr.read()
    if p.wait() != 0:
        raise SelfShapeError(f"{what} failed: {err.strip()}")


def _gso_of(dev: str) -> int:
    out = subprocess.run(["ip", "-d", "link", "show", "dev", dev], capture_output=True, text=True).stdout
    m = re.search(r"\bgso_max_size (\d+)", out)
    return int(m.group(1)) if m else 65536


def _netns_inode(pid: str | int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _guard_send(proc: subprocess.Popen, line: str) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    except OSError:
        pass  # the guard is gone: the registry and `testbed clean` remain


def _close_guard(proc: subprocess.Popen) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


# -- leftovers of nodes that died (testbed clean) ----------------------------------------------

def dead_node_records(registry_dir: Path = REGISTRY_DIR) -> list[tuple[Path, dict]]:
    """Registry files of self-shaping nodes whose process is gone (pid and start time)."""
    out = []
    if not registry_dir.is_dir():
        return out
    for p in sorted(registry_dir.glob(REGISTRY_GLOB)):
        try:
            reg = json.loads(p.read_text())
        except (OSError, ValueError):
            out.append((p, {}))
            continue
        if _start_time(int(reg.get("owner_pid", 0))) != reg.get("owner_start"):
            out.append((p, reg))
    return out


def netns_path(inode: int | None) -> str | None:
    """A path that enters the network namespace with this inode: this one's (""), a named one
    (/run/netns), or any process's living in it; None: the namespace is gone."""
    if inode is None:
        return None
    if _netns_inode("self") == inode:
        return ""
    named = Path("/run/netns")
    if named.is_dir():
        for p in named.iterdir():
            try:
                if os.stat(p).st_ino == inode:
                    return str(p)
            except OSError:
                pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _netns_inode(entry.name) == inode:
            return f"/proc/{entry.name}/ns/net"
    return None


def clean_dead_nodes(registry_dir: Path = REGISTRY_DIR, dry_run: bool = False) -> list[str]:
    """Undo what dead self-shaping nodes left in namespaces that still exist; remove their
    registry files. Returns one line per node found."""
    lines = []
    for path, reg in dead_node_records(registry_dir):
        ns = netns_path(reg.get("netns"))
        rec = Record.from_json(json.dumps(reg.get("record", {})))
        what = f"self-shaping node {reg.get('owner_pid', '?')}: " + \
            ("namespace gone" if ns is None else f"chain {rec.chain or '-'}, qdiscs on {', '.join(rec.devs) or '-'}"
             + (f", IFB {rec.ifb}" if rec.ifb else "") + (f" in {ns}" if ns else " in this namespace"))
        lines.append(what)
        if dry_run:
            continue
        if ns is not None and not rec.empty():
            failed = undo(rec, ["nsenter", f"--net={ns}"] if ns else [])
            if failed:
                lines.append("  not removed: " + "; ".join(failed))
        path.unlink(missing_ok=True)
    return lines


def guard_main(registry: Path | None = None) -> int:
    """The guard: keeps the last record its node sent; if its stdin ends without ``done`` (the
    node died without cleaning up), undoes it in this namespace and removes the node's
    ``registry`` file (nothing is left for `testbed clean`)."""
    last = None
    for line in sys.stdin:
        line = line.strip()
        if line == GUARD_DONE:
            last = None
        elif line:
            last = line
    if last is not None:
        rec = Record.from_json(last)
        failed = undo(rec)
        if registry is not None and not failed:
            registry.unlink(missing_ok=True)
        print(f"testbed.net.selfshape: the node died while shaped; removed its chain and qdiscs"
              + (f" (not removed: {'; '.join(failed)})" if failed else ""), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["guard"] and len(sys.argv) <= 3:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C to the node must not stop the guard first
        sys.exit(guard_main(Path(sys.argv[2]) if len(sys.argv) == 3 else None))
    print("usage: python -m testbed.net.selfshape guard [REGISTRY_FILE]", file=sys.stderr)
    sys.exit(2)
