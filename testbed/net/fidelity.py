"""Fidelity self-check: do the emulated paths deliver what their profiles promise?

For each measured host pair: TCP goodput by iperf3 (receiver side, first second omitted so TCP's
start-up is not counted) against the path's narrowest configured bandwidth (less the flow's own
ACKs on a shared medium); ping RTT against the
configured one-way delays of both directions added up (ping runs SCHED_FIFO: a normally scheduled
ping on a busy machine reads replies late); ping loss against the configured losses. Ping runs
twice: with ``-U`` (user-space timestamps, what applications see) and plain (kernel receive
timestamps, what a user checking the emulation with ping or tcpdump sees). Under htb+nfqueue
a path held in a switch (testbed.net.tc) reaches the receiver delayed, so both show the whole
round trip; a path held by its receiver (a direct host-to-host link) is timestamped by the
receiver's kernel before the delay line holds it, so plain ping misses the reply direction's
delay. The table says where each direction is held and checks plain ping against what it
should show there.

What counts as faithful is defined once, below (GOODPUT_RATIO, RTT_ERROR_MS, LOSS_SIGMAS), for
`testbed fidelity`, the fidelity benchmark (testbed.bench.fidelity) and the root tests.

CLI: ``testbed fidelity TOPOLOGY.yaml [--out DIR]`` prints the table and writes fidelity.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import select
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from testbed.errors import ConfigError

IPERF_PORT = 5201  # every host has its own namespace, so a fixed port cannot collide
PING_RT_PRIORITY = 5  # below the delay lines' (testbed.net.delayline.DELAYLINE_RT_PRIORITY)

# -- tolerances ----------------------------------------------------------------------------
# TCP goodput / configured bandwidth. htb counts whole Ethernet frames (1514 B for a 1500-byte
# packet) and a full segment carries 1448 B of payload (20 B IP, 20 B TCP, 12 B timestamps), so
# a saturated link yields at most 1448/1514 = 0.956 (measured 0.942-0.956 over 10-1000 Mbit/s x
# 0-50 ms). The floor leaves 2.6 points for TCP's recovery from tail drops in the byte queue
# and iperf3's interval edges; the ceiling 1.00 (a link never carries more than its rate)
# leaves room for those edges upwards.
GOODPUT_RATIO = (0.93, 1.00)
# On a shared medium a flow's own ACKs cross the same bottleneck as its data (one 66-byte ACK
# frame per two full segments, Linux's delayed ACK: 10,625 ACKs to 21,040 segments counted on a
# 20 Mbit/s medium's IFB), so data gets 1 - 66 / (2 * 1514 + 66) of the medium's rate. The
# goodput ratio of such a path is taken against that share (measured 0.9355 of the rate, i.e.
# 0.956 of the share, the same as on a link).
MEDIUM_ACK_SHARE = 66 / (2 * 1514 + 66)
# |mean ping RTT - configured round trip|, in ms. The error is additive, not proportional to the
# delay: the veth/bridge round trip (0.07-0.13 ms measured without delay) plus, on each delayed
# direction, the delay line's release (wake-up, verdict, re-injection): +0.4 to +0.8 ms measured
# at 10-200 ms round trips on 2 idle cores. On 2 cores shared with other work, ping and the delay
# lines (SCHED_FIFO) still wait for the kernel's packet processing and for each other: the mean
# of 20 pings was above +1.5 ms in 3 of 240 runs at 40-100 ms round trips, once +2.3 ms (single
# replies up to 22 ms late). At 2 ms a correct link on such a machine fails about 1 check in
# 200, and a delay set 1 ms wrong in each direction fails (+2.8 ms on an idle machine). ping's
# mean is printed to the microsecond (per-reply times are rounded to 3 digits), so its
# granularity does not count.
RTT_ERROR_MS = 2.0
# Ping loss over n pings is binomial: a correct link at p % shows p +/- LOSS_SIGMAS standard
# deviations (100 * sqrt(p/100 * (1 - p/100) / n)) in all but 0.05 % of runs (two-sided, 3.5 sd).
LOSS_SIGMAS = 3.5


HELD_NOTE = ("switch = before the receiver's stack, every tool in the hosts sees the delay; receiver = "
             "after the receiver's kernel timestamps (direct host-to-host links under htb+nfqueue): TCP and "
             "ping -U see it, plain ping and tcpdump on the receiver do not; sender = netem on the egress")


def data_capacity_mbps(topology, src: str, dst: str) -> float | None:
    """The rate TCP data from ``src`` to ``dst`` can use: the narrowest configured hop, less the
    flow's own ACKs where that hop is a shared medium the return path enters too (None: unshaped)."""
    bw = topology.one_way(src, dst).bandwidth_mbps
    if bw is None:
        return None
    back = {sw.name for sw in topology.mediums(dst, src)}
    if any(sw.name in back and sw.medium.bandwidth_mbps == bw for sw in topology.mediums(src, dst)):
        return bw * (1 - MEDIUM_ACK_SHARE)
    return bw


def goodput_ok(ratio: float) -> bool:
    """Goodput / configured bandwidth within GOODPUT_RATIO."""
    return GOODPUT_RATIO[0] <= ratio <= GOODPUT_RATIO[1]


def rtt_ok(error_ms: float) -> bool:
    """Mean RTT minus the configured round trip within RTT_ERROR_MS."""
    return abs(error_ms) <= RTT_ERROR_MS


def loss_range(expected_pct: float, pings: int) -> tuple[float, float]:
    """Ping loss % a correct link at ``expected_pct`` shows over ``pings`` pings (LOSS_SIGMAS)."""
    p = expected_pct / 100
    spread = 100 * LOSS_SIGMAS * math.sqrt(p * (1 - p) / pings)
    return max(0.0, expected_pct - spread), min(100.0, expected_pct + spread)


@dataclass
class FidelityRow:
    src: str
    dst: str
    bandwidth_mbps: float | None  # narrowest configured hop of the path (None: unshaped)
    delay_ms: float  # configured one-way delay src -> dst
    loss_pct: float  # configured loss src -> dst
    goodput_mbps: float | None = None
    goodput_ratio: float | None = None  # goodput / data_capacity_mbps (bandwidth_mbps but on a medium)
    rtt_expected_ms: float = 0.0  # configured delay src -> dst plus dst -> src
    rtt_ms: float | None = None  # mean ping RTT
    rtt_error_ms: float | None = None  # rtt_ms - rtt_expected_ms
    ping_loss_pct: float | None = None  # round-trip loss seen by ping
    held: str = ""  # where src -> dst / dst -> src hold their delay (Emulation.delay_point), e.g. "switch/switch"
    rtt_plain_expected_ms: float = 0.0  # what plain ping shows: the reply's delay is missed if its receiver holds it
    rtt_plain_ms: float | None = None  # mean RTT of plain ping (kernel receive timestamps)
    rtt_plain_error_ms: float | None = None

    def ok(self) -> bool:
        """Goodput and both RTTs within the tolerances (what was not measured counts as within)."""
        return (self.goodput_ratio is None or goodput_ok(self.goodput_ratio)) and \
            all(e is None or rtt_ok(e) for e in (self.rtt_error_ms, self.rtt_plain_error_ms))


def run_in(em, host: str, argv: list[str], timeout_s: float = 120.0) -> str:
    """Run a measuring tool in ``host``'s namespace but outside its device cgroup (the link is
    measured, not the device: a 0.25 CPU share must not cap iperf3, and such a cgroup may not
    allow real-time scheduling), labelled as the run's (testbed.net.keeper); returns stdout and
    stderr together."""
    p = subprocess.run(em.ns_argv(host) + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout_s, env=em.env())
    return p.stdout


def start_iperf_server(em, host: str, timeout_s: float = 15.0, port: int = IPERF_PORT) -> subprocess.Popen:
    """A one-shot iperf3 server on ``host``, returned once it listens (busy machines start slowly)."""
    server = em.popen(host, ["iperf3", "-s", "-1", "-p", str(port), "--forceflush"], device=False,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, deadline = b"", time.monotonic() + timeout_s
    fd = server.stdout.fileno()  # raw reads: a buffered readline could hide the line from select
    while b"listening" not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            break
        seen += chunk
    if b"listening" not in seen:
        server.kill()
        server.wait()
        raise RuntimeError(f"iperf3 server on {host} did not start: {seen.decode(errors='replace')[-300:]}")
    return server


def socket_buffer_bytes(em, src: str, dst: str) -> int | None:
    """An iperf3 window for long fat paths: twice the bandwidth-delay product, at most 16 MiB.

    Default buffers cap one TCP flow below the rate on such paths (measured: 0.886 of 1 Gbit/s at
    100 ms RTT, 0.947 with -w 16M): that is the host's limit, not the link's. None below 4 MiB.
    """
    eff = em.topology.path_effect(src, dst)
    bdp = (eff.bandwidth_mbps or 0) * 1e6 / 8 * eff.rtt_ms / 1e3
    return min(int(2 * bdp), 16 << 20) if 2 * bdp > 4 << 20 else None


def iperf_goodput(em, src: str, dst: str, seconds: float = 3.0, omit_s: float = 1.0) -> float:
    """TCP goodput src -> dst in Mbit/s as the receiver counted it (first ``omit_s`` not counted)."""
    server = start_iperf_server(em, dst)
    window = socket_buffer_bytes(em, src, dst)
    try:
        out = run_in(em, src, ["iperf3", "-c", em.data_ip(dst), "-p", str(IPERF_PORT), "-t", f"{seconds:g}",
                               "-O", f"{omit_s:g}", "-J"] + (["-w", str(window)] if window else []),
                     timeout_s=seconds + omit_s + 60)
        try:
            result = json.loads(out[out.index("{"):])
        except ValueError:
            result = {"error": out.strip()[-300:]}
        if "error" in result:
            raise RuntimeError(f"iperf3 {src} -> {dst}: {result['error']}")
        return result["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()


_LOSS = re.compile(r"([\d.]+)% packet loss")
_SUMMARY = re.compile(r"= [\d.]+/([\d.]+)/")
_REPLY = re.compile(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms")


@dataclass
class PingStats:
    rtts_ms: list[float]  # per reply, in arrival order (ping rounds them: 0.1 ms above 10 ms, 1 ms above 100)
    seqs: list[int]  # icmp_seq of each reply, in arrival order
    loss_pct: float
    mean_ms: float | None = None  # ping's own mean, to the microsecond (None: no reply)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.rtts_ms) if self.rtts_ms else None


def ping(em, src: str, dst: str, count: int = 20, interval_s: float = 0.02, wait_s: float = 1.0,
         user_timestamps: bool = True) -> PingStats:
    """Ping ``dst``'s data address from ``src`` with user-space timestamps (``-U``; False: the
    kernel's receive timestamps, as plain ``ping`` and tcpdump use).

    Sends exactly ``count`` echo requests (no -w: with a deadline ping keeps sending until
    ``count`` replies came back, which hides losses); waits ``wait_s`` beyond the slowest RTT
    for late replies.
    """
    run_in(em, src, ["ping", "-n", "-c", "1", "-W", "2", em.data_ip(dst)])  # ARP first: not part of the RTT
    timeout = math.ceil(wait_s + 2 * em.topology.path_effect(src, dst).rtt_ms / 1e3)
    # SCHED_FIFO (below the delay lines): on a busy machine a normally scheduled ping reads its
    # replies tens of ms late (measured: 20 ms RTT seen as up to 63 ms at load 9 on 2 cores)
    out = run_in(em, src, ["chrt", "-f", str(PING_RT_PRIORITY), "ping"] + (["-U"] if user_timestamps else [])
                 + ["-n", "-c", str(count),
                           "-i", f"{interval_s:g}", "-W", str(timeout), em.data_ip(dst)],
                 timeout_s=count * interval_s + timeout + 30)
    replies = _REPLY.findall(out)
    loss = _LOSS.search(out)
    if loss is None:
        raise RuntimeError(f"ping {src} -> {dst} printed no summary: {out.strip()[-300:]}")
    mean = _SUMMARY.search(out)
    return PingStats([float(t) for _s, t in replies], [int(s) for s, _t in replies], float(loss.group(1)),
                     float(mean.group(1)) if mean else None)


def check_pair(em, src: str, dst: str, seconds: float = 3.0, pings: int = 20) -> FidelityRow:
    """Measure one path (goodput only where the path is shaped)."""
    fwd = em.topology.path_effect(src, dst)
    back = em.delay_point(dst, src)
    row = FidelityRow(src, dst, fwd.bandwidth_mbps, fwd.delay_ms, fwd.loss_pct, rtt_expected_ms=fwd.rtt_ms,
                      held=f"{em.delay_point(src, dst)}/{back}",
                      rtt_plain_expected_ms=fwd.rtt_ms - (fwd.rtt_ms - fwd.delay_ms if back == "receiver" else 0))
    stats = ping(em, src, dst, count=pings)
    rtt = stats.mean_ms
    row.rtt_ms, row.ping_loss_pct = rtt, stats.loss_pct
    row.rtt_error_ms = None if rtt is None else rtt - fwd.rtt_ms
    plain = ping(em, src, dst, count=pings, user_timestamps=False).mean_ms
    row.rtt_plain_ms = plain
    row.rtt_plain_error_ms = None if plain is None else plain - row.rtt_plain_expected_ms
    if fwd.bandwidth_mbps is not None:
        row.goodput_mbps = iperf_goodput(em, src, dst, seconds)
        row.goodput_ratio = row.goodput_mbps / data_capacity_mbps(em.topology, src, dst)
    return row


def distinct_pairs(topology) -> list[tuple[str, str]]:
    """One host pair per distinct (forward, reverse) path profile: enough to cover every link profile."""
    seen, out = set(), []
    names = topology.host_names
    for i, src in enumerate(names):
        for dst in names[i + 1:]:
            key = (topology.path_effect(src, dst), topology.path_effect(dst, src))
            if key not in seen:
                seen.add(key)
                out.append((src, dst))
    return out


def format_table(rows: list[FidelityRow]) -> str:
    head = f"{'path':<14}{'bw Mbit/s':>10}{'goodput':>10}{'ratio':>7}{'delay ms':>9}{'RTT exp':>9}{'RTT -U':>9}" \
           f"{'err ms':>8}{'plain exp':>10}{'plain':>9}{'err ms':>8}{'held':>19}{'loss %':>7}{'ping loss':>10}{'':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(x, spec):
            return format(x, spec) if x is not None else "-"
        lines.append(f"{r.src + '->' + r.dst:<14}{f(r.bandwidth_mbps, '10g')}{f(r.goodput_mbps, '10.2f')}"
                     f"{f(r.goodput_ratio, '7.3f')}{r.delay_ms:9.2f}{r.rtt_expected_ms:9.2f}{f(r.rtt_ms, '9.2f')}"
                     f"{f(r.rtt_error_ms, '8.2f')}{r.rtt_plain_expected_ms:10.2f}{f(r.rtt_plain_ms, '9.2f')}"
                     f"{f(r.rtt_plain_error_ms, '8.2f')}{r.held:>19}{r.loss_pct:7.2f}{f(r.ping_loss_pct, '10.1f')}"
                     f"{'ok' if r.ok() else 'MISS':>6}")
    lines.append(f"ok: goodput ratio in {GOODPUT_RATIO[0]:g}-{GOODPUT_RATIO[1]:g}, |RTT error| <= {RTT_ERROR_MS:g} ms "
                 "(ping -U and plain ping)")
    lines.append(f"held (there/back): {HELD_NOTE}")
    return "\n".join(lines)


def write_csv(rows: list, path: Path, extra: dict | None = None) -> None:
    """Rows (dataclasses) as CSV, each with the ``extra`` columns (e.g. mechanism) in front."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    names = list(extra) + [f.name for f in fields(rows[0])] if rows else list(extra)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({**extra, **asdict(r)})


def main(argv: list[str]) -> int:
    from testbed.net.emulation import Emulation
    from testbed.net.probe import EmulationUnavailable
    from testbed.net.topology import load_topology

    ap = argparse.ArgumentParser(prog="testbed fidelity", description="check emulated links against their profiles")
    ap.add_argument("topology", help="topology YAML (or a name in topologies/: star, mesh, line, ...)")
    ap.add_argument("--out", default="results/fidelity", help="directory for fidelity.csv (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 seconds per path (default: %(default)s)")
    ap.add_argument("--mechanism", default="auto", help="auto, htb+nfqueue or htb+netem")
    args = ap.parse_args(argv)
    try:
        topo = load_topology(args.topology)
        with Emulation(topo, mechanism=args.mechanism) as em:
            print(f"topology {topo.name}: {len(topo.hosts)} hosts, mechanism {em.mechanism}")
            rows = [check_pair(em, s, d, args.seconds) for s, d in distinct_pairs(topo)]
            mechanism = em.mechanism
    except (ConfigError, EmulationUnavailable) as e:
        print(f"testbed fidelity: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    out = Path(args.out) / "fidelity.csv"
    write_csv(rows, out, {"topology": topo.name, "mechanism": mechanism})
    print(f"saved {out}")
    return 0
