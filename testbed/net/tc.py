"""LinkProfile -> tc and iptables command lines. Pure functions: no root needed to test them.

Two mechanisms (picked by testbed.net.probe):
- ``htb+netem``: the link direction's egress gets an htb class for the bandwidth and a netem leaf
  for delay, jitter, loss and the queue. Standard, but needs sch_netem.
- ``htb+nfqueue`` (kernels without netem, like ours): the egress gets the htb class with a
  byte FIFO leaf; delay and jitter are held by a delay line (testbed.net.delayline) on NFQUEUE,
  one queue per path, and loss is dropped just before it by iptables' statistic match. Delays
  and losses of every hop of a path are composed into the path's one rule (see
  Topology.one_way). Where the rule sits:
  - a path whose last hop leaves a switch (star, line, edge_cloud, shared_medium): in the root
    namespace, where the bridge forwards the packet to the receiver's port (br_netfilter's
    FORWARD hook, ``switch_rules``; one delay line per run). The packet reaches the receiver
    already delayed, so everything inside the hosts sees the delay: TCP, plain ``ping`` (kernel
    receive timestamps), tcpdump. TCP keeps its goodput: the held packet left the sender's
    socket (goodput/rate 0.946-0.956 over 10-1000 Mbit/s x 0-100 ms round trip, as when held
    by the receiver; on 2 cores at load 5-10, 0.917-0.954 at 100 Mbit/s and 100 ms beside
    0.901-0.923 held by the receiver in the same runs);
  - a direct host-to-host link (mesh): no forwarding point exists, so on the receiving host's
    INPUT hook (``receiver_rules``; one delay line per receiving host). The kernel timestamps a
    packet before INPUT holds it: TCP and user-space timestamps (``ping -U``) see the delay,
    plain ``ping`` and tcpdump on the receiver see only the other direction's.
  Never on the sender: held packets stay charged to the sending socket (TCP small queues) and
  TCP collapses (2.3 vs 93.6 Mbit/s at 20 ms).

A node that shapes itself (testbed.net.selfshape, a real device or a container) uses the same
functions from inside its own namespace: ``peer_commands`` gives its interface one htb class per
peer (``class_commands``, as a link direction gets here) with a u32 filter on the peer's address,
``receiver_rules(own=True)`` holds what it receives in its own chain, and on netem kernels
``ingress_redirect_commands`` sends each peer's packets through an IFB with a netem class.

Sizing, from the rate (Mininet's fixed 15 KB burst caps throughput well below 1 Gbit/s, and
its TCLink refuses rates above 1000 Mbit/s):
- burst/cburst: 1 ms of traffic at the rate, at least two full frames. The kernel releases
  htb tokens at timer granularity; a bucket smaller than what arrives between timer runs
  throttles the link below its rate.
- quantum: the burst clamped to [1 frame, 200 000 B] (the kernel warns outside that range;
  a single class never competes, so it only needs to be legal).
- queue: ``queue_packets`` full frames when given, else the bandwidth-delay product of the
  longest round trip that crosses the link, at least 20 ms of traffic and 16 frames; and never
  less than one 64 KiB GSO packet plus two frames (see below).
- GSO: TCP always hands the qdisc GSO super-packets (up to 64 KiB; segmented only after the
  qdisc), so an htb byte queue shorter than one of them drops every one of them and TCP stalls
  (measured: 0.006 of 10 Mbit/s). Each host's interfaces therefore get ``gso_max_size`` = 1 ms of
  the narrowest path leaving the host (2 frames .. 64 KiB): packets stay about as long as the
  bucket is deep and the delay line sees few of them at high rates. A connection keeps the GSO
  size it started with, hence the queue floor above: a link slowed down live never stalls a
  connection opened while it was fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from testbed.errors import check
from testbed.net.profile import MAX_BANDWIDTH_MBPS, LinkProfile

MECHANISMS = ("htb+nfqueue", "htb+netem")
FRAME_BYTES = 1514  # an Ethernet frame carrying a 1500-byte packet: the unit of queue_packets
BURST_S = 0.001  # htb bucket: this much time of traffic at the rate
MIN_QUEUE_S = 0.020  # default queue holds at least this much time of traffic
MIN_QUEUE_FRAMES = 16
MAX_QUANTUM_BYTES = 200_000
MAX_GSO_BYTES = 65_536  # the kernel's default (and largest IPv4) GSO packet
CHAIN = "TBNET"  # iptables chain of the testbed in each host's namespace (INPUT jumps to it)
MAX_MINOR = 0xFFF  # htb class minors used (leaf handles <minor>0: must stay below 0x10000)
PEER_DEFAULT_MINOR = 0xFFFF  # per-peer devices: a class that never exists, so unclassified frames pass unshaped
IPT = "iptables-legacy"  # never nft: this kernel has no nft queue, and the two must not mix


def rate_bits(bandwidth_mbps: float) -> int:
    """Link rate in bit/s as tc wants it (an integer)."""
    return max(8, round(bandwidth_mbps * 1e6))


def burst_bytes(bandwidth_mbps: float) -> int:
    return max(2 * FRAME_BYTES, math.ceil(bandwidth_mbps * 1e6 / 8 * BURST_S))


def quantum_bytes(bandwidth_mbps: float) -> int:
    return min(MAX_QUANTUM_BYTES, max(FRAME_BYTES, burst_bytes(bandwidth_mbps)))


def queue_limit_bytes(profile: LinkProfile, rtt_ms: float = 0.0) -> int:
    """Egress queue in bytes: queue_packets frames, else max(BDP of rtt_ms, 20 ms, 16 frames);
    at least one largest GSO packet plus two frames either way (see the module docstring)."""
    floor = MAX_GSO_BYTES + 2 * FRAME_BYTES
    if profile.queue_packets is not None:
        return max(floor, profile.queue_packets * FRAME_BYTES)
    rate_bps = (profile.bandwidth_mbps or MAX_BANDWIDTH_MBPS) * 1e6 / 8
    return max(floor, MIN_QUEUE_FRAMES * FRAME_BYTES, math.ceil(rate_bps * max(rtt_ms / 1e3, MIN_QUEUE_S)))


def gso_max_bytes(bandwidth_mbps: float | None) -> int:
    """GSO packet size for a host whose narrowest outgoing path has this rate (None: unshaped)."""
    if bandwidth_mbps is None:
        return MAX_GSO_BYTES
    return min(MAX_GSO_BYTES, burst_bytes(bandwidth_mbps))


def _us(ms: float) -> str:
    return f"{round(ms * 1000)}us"


def _htb_root(dev: str, default_minor: int) -> list[str]:
    """The root htb; frames no filter classifies go to class 1:<default_minor>, or straight out
    unshaped where that class does not exist (htb's direct queue)."""
    return ["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", f"{default_minor:x}"]


def _htb_class(dev: str, verb: str, bandwidth_mbps: float, minor: int = 1) -> list[str]:
    b = burst_bytes(bandwidth_mbps)
    return ["tc", "class", verb, "dev", dev, "parent", "1:", "classid", f"1:{minor:x}", "htb",
            "rate", f"{rate_bits(bandwidth_mbps)}bit", "burst", str(b), "cburst", str(b),
            "quantum", str(quantum_bytes(bandwidth_mbps))]


def _netem_args(profile: LinkProfile, rtt_ms: float) -> list[str]:
    # netem's limit counts packets it is delaying as well as those queued behind the rate
    rate_bps = (profile.bandwidth_mbps or MAX_BANDWIDTH_MBPS) * 1e6 / 8
    in_flight = math.ceil(rate_bps * (profile.delay_ms + profile.jitter_ms) / 1e3 / FRAME_BYTES)
    limit = max(1000, queue_limit_bytes(profile, rtt_ms) // FRAME_BYTES + in_flight)
    args = ["netem", "limit", str(limit)]
    if profile.delay_ms or profile.jitter_ms:
        args += ["delay", _us(profile.delay_ms)] + ([_us(profile.jitter_ms)] if profile.jitter_ms else [])
    if profile.loss_pct:
        args += ["loss", f"{profile.loss_pct:.6f}%"]
    return args


LEAVES = ("bfifo", "netem")


def class_commands(dev: str, verb: str, profile: LinkProfile, leaf: str, rtt_ms: float = 0.0,
                   minor: int = 1) -> list[list[str]]:
    """THE profile-to-tc function: htb class 1:<minor> at the profile's rate (the largest rate
    where it has none) and its leaf qdisc <minor>0: under it, ``add``-ed or ``change``-d (``verb``).

    ``leaf`` "bfifo": a byte FIFO of ``queue_limit_bytes`` (delay and loss live elsewhere);
    "netem": netem with the profile's delay, jitter and loss. Both callers shape through it:
    ``egress_commands`` (one class per link direction, the Mininet shaper) and
    ``peer_commands`` (one class per peer, a self-shaping node, testbed.net.selfshape).
    """
    check(leaf in LEAVES, "leaf", leaf, ", ".join(LEAVES))
    check(1 <= minor <= MAX_MINOR, "minor", minor, f"1..{MAX_MINOR}")
    head = ["tc", "qdisc", verb, "dev", dev, "parent", f"1:{minor:x}", "handle", f"{minor:x}0:"]
    args = _netem_args(profile, rtt_ms) if leaf == "netem" else ["bfifo", "limit",
                                                                  str(queue_limit_bytes(profile, rtt_ms))]
    return [_htb_class(dev, verb, profile.bandwidth_mbps or MAX_BANDWIDTH_MBPS, minor), head + args]


def _layout(profile: LinkProfile | None, mechanism: str) -> str:
    """What sits on the egress: 'none', 'htb' (htb + bfifo), 'htb+netem', or 'netem' (root)."""
    if profile is None:
        return "none"
    shaped = profile.bandwidth_mbps is not None
    if mechanism == "htb+nfqueue":
        return "htb" if shaped else "none"
    if shaped:
        return "htb+netem"
    return "netem" if (profile.delay_ms or profile.jitter_ms or profile.loss_pct) else "none"


def egress_commands(dev: str, profile: LinkProfile, mechanism: str, rtt_ms: float = 0.0,
                    old: LinkProfile | None = None) -> list[list[str]]:
    """tc argv lists that make ``dev``'s egress follow ``profile`` (one link direction: every frame
    leaving ``dev`` goes through class 1:1).

    ``old`` is what is installed now (None: nothing). When old and new have the same layout the
    commands change the running qdisc/class in place (no packet of the queue is lost); otherwise
    the root qdisc is replaced. ``rtt_ms`` sizes the default queue (longest round trip crossing it).
    """
    check(mechanism in MECHANISMS, "mechanism", mechanism, ", ".join(MECHANISMS))
    new_layout, old_layout = _layout(profile, mechanism), _layout(old, mechanism)
    verb = "change" if new_layout == old_layout else "add"
    cmds: list[list[str]] = []
    if old_layout != "none" and new_layout != old_layout:
        cmds.append(["tc", "qdisc", "del", "dev", dev, "root"])
    if new_layout == "none":
        return cmds
    if new_layout == "netem":
        return cmds + [["tc", "qdisc", verb, "dev", dev, "root", "handle", "1:"] + _netem_args(profile, rtt_ms)]
    assert profile.bandwidth_mbps is not None
    if verb == "add":
        cmds.append(_htb_root(dev, 1))
    return cmds + class_commands(dev, verb, profile, "netem" if new_layout == "htb+netem" else "bfifo", rtt_ms)


@dataclass(frozen=True)
class PeerClass:
    """One peer's class on a device shaped per peer (a self-shaping node): class 1:<minor>,
    leaf <minor>0:, and a u32 filter of priority <minor> on the peer's address."""

    minor: int
    profile: LinkProfile
    rtt_ms: float = 0.0  # sizes the default queue (the round trip to that peer)


def peer_commands(dev: str, new: Mapping[str, PeerClass], old: Mapping[str, PeerClass] | None = None,
                  match: str = "dst", leaf: str = "bfifo") -> list[list[str]]:
    """tc argv lists that give ``dev`` one htb class per peer address (``new``: IPv4 address ->
    its class), each classified by a filter on the packet's ``match`` address ("dst": what this
    host sends to the peer; "src": what arrives from it, on an IFB). Frames to or from any other
    address pass unshaped (htb's direct queue: the default class does not exist).

    ``old`` is what is installed now; only what differs is touched: a class whose profile changed
    is changed in place, a new peer gets its class and filter, a peer gone loses both, and the
    root qdisc comes and goes with the first and last class. The class and leaf of each peer are
    ``class_commands``', the same as one link direction's in the Mininet shaper.
    """
    check(match in ("dst", "src"), "match", match, "dst, src")
    old = old or {}
    cmds: list[list[str]] = []
    if not new:
        return [["tc", "qdisc", "del", "dev", dev, "root"]] if old else []
    if not old:
        cmds.append(_htb_root(dev, PEER_DEFAULT_MINOR))
    for ip, pc in old.items():
        if ip not in new or new[ip].minor != pc.minor:
            cmds.append(_peer_filter(dev, "del", ip, pc.minor, match)[:11])
            cmds.append(["tc", "class", "del", "dev", dev, "classid", f"1:{pc.minor:x}"])
    for ip, pc in new.items():
        was = old.get(ip)
        if was is not None and was.minor == pc.minor:
            if class_commands(dev, "add", was.profile, leaf, was.rtt_ms, was.minor) != \
                    class_commands(dev, "add", pc.profile, leaf, pc.rtt_ms, pc.minor):
                cmds += class_commands(dev, "change", pc.profile, leaf, pc.rtt_ms, pc.minor)
            continue
        cmds += class_commands(dev, "add", pc.profile, leaf, pc.rtt_ms, pc.minor)
        cmds.append(_peer_filter(dev, "add", ip, pc.minor, match))
    return cmds


def _peer_filter(dev: str, verb: str, ip: str, minor: int, match: str) -> list[str]:
    return ["tc", "filter", verb, "dev", dev, "parent", "1:", "protocol", "ip", "prio", str(minor),
            "u32", "match", "ip", match, f"{ip}/32", "flowid", f"1:{minor:x}"]


def ingress_redirect_commands(dev: str, ifb: str, new: Mapping[str, int], old: Mapping[str, int] | None = None
                              ) -> list[list[str]]:
    """tc argv lists that send what arrives on ``dev`` from each source address of ``new``
    (address -> filter priority) through the IFB device ``ifb``, where ``peer_commands(ifb, ...,
    match="src", leaf="netem")`` holds it: receive-side delay with netem. Only what differs from
    ``old`` is touched; the ingress qdisc comes and goes with the first and last source."""
    old = old or {}
    if not new:
        return [["tc", "qdisc", "del", "dev", dev, "ingress"]] if old else []
    cmds = [] if old else [["tc", "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"]]
    for ip, prio in old.items():
        if new.get(ip) != prio:
            cmds.append(["tc", "filter", "del", "dev", dev, "parent", "ffff:", "protocol", "ip", "prio", str(prio)])
    for ip, prio in new.items():
        if old.get(ip) != prio:
            cmds.append(_redirect(dev, ifb, ["protocol", "ip", "prio", str(prio), "u32", "match", "ip", "src",
                                             f"{ip}/32"]))
    return cmds


def _redirect(port: str, ifb: str, match: list[str]) -> list[str]:
    return ["tc", "filter", "add", "dev", port, "parent", "ffff:"] + match + \
        ["action", "mirred", "egress", "redirect", "dev", ifb]


def medium_commands(ifb: str, ports: list[str]) -> list[list[str]]:
    """Send every frame arriving on ``ports`` through the IFB device ``ifb`` (one shared queue).

    The medium's own shaping is ``egress_commands(ifb, ...)``; ``ip link add <ifb> type ifb``
    comes first (testbed.net.emulation does that).
    """
    cmds = []
    for p in ports:
        cmds.append(["tc", "qdisc", "add", "dev", p, "handle", "ffff:", "ingress"])
        cmds.append(_redirect(p, ifb, ["protocol", "all", "u32", "match", "u32", "0", "0"]))
    return cmds


@dataclass(frozen=True)
class SourceRule:
    """What one path does to its packets (htb+nfqueue mechanism), matched by source address and,
    in a switch, by the bridge port that leads to the receiver."""

    src_ip: str
    queue_num: int  # the delay line's queue for this path
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    port: str = ""  # the switch port towards the receiver ("": held in the receiver's namespace)

    @property
    def match(self) -> str:
        return f"-s {self.src_ip}/32" + (f" -m physdev --physdev-out {self.port}" if self.port else "")

    @property
    def delayed(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0


def receiver_rules(rules: list[SourceRule], first: bool = False, chain: str = CHAIN, own: bool = False) -> str:
    """Input for ``iptables-legacy-restore --noflush`` in the receiving host's namespace.

    Declaring the chain flushes it, so the whole rule set is swapped in one atomic commit
    (a live change never passes through an empty set). ``first`` also hooks the chain into INPUT.
    Loss comes before the queue so dropped packets are never delayed first.

    ``own``: the namespace is not the testbed's alone (a self-shaping node's device or container,
    testbed.net.selfshape): the hook goes first in INPUT, before the host's own firewall rules,
    and a packet whose delay line is gone passes undelayed (``--queue-bypass``) rather than being
    dropped, so a node killed before it could clean up never cuts its host off.
    """
    hook = (f"-I INPUT -j {chain}" if own else f"-A INPUT -j {chain}") if first else None
    return _chain_rules(chain, rules, hook, bypass=own)


def switch_rules(chain: str, bridges: str, rules: list[SourceRule], first: bool = False) -> str:
    """Input for ``iptables-legacy-restore --noflush -w`` in the root namespace: the run's paths
    that cross a switch, each matched where the bridge forwards it to the receiver's port.

    ``chain`` is the run's own chain; ``first`` hooks it at the top of FORWARD for frames bridged
    by ``bridges`` (an interface pattern matching the run's data bridges). The chain ends by
    accepting the rest of the run's bridged traffic, so a FORWARD policy of DROP (set by other
    software) does not cut the emulated hosts off.
    """
    hook = f"-I FORWARD -i {bridges} -m physdev --physdev-is-bridged -j {chain}" if first else None
    return _chain_rules(chain, rules, hook, tail=f"-A {chain} -j ACCEPT")


def _chain_rules(chain: str, rules: list[SourceRule], hook: str | None, tail: str | None = None,
                 bypass: bool = False) -> str:
    lines = ["*filter", f":{chain} - [0:0]"] + ([hook] if hook else [])
    for r in rules:
        if r.loss_pct > 0:
            lines.append(f"-A {chain} {r.match} -m statistic --mode random "
                         f"--probability {r.loss_pct / 100:.10f} -j DROP")
        if r.delayed:
            lines.append(f"-A {chain} {r.match} -j NFQUEUE --queue-num {r.queue_num}"
                         + (" --queue-bypass" if bypass else ""))
    lines += ([tail] if tail else []) + ["COMMIT"]
    return "\n".join(lines) + "\n"


def delayline_config(rules: list[SourceRule]) -> dict:
    """A delay line's queue settings for the paths it holds (every path, delayed or not)."""
    return {str(r.queue_num): {"delay_ms": r.delay_ms, "jitter_ms": r.jitter_ms} for r in rules}
