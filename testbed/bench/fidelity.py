"""Benchmark: how faithfully do emulated links deliver their profiles, and how fast do they change?

``python -m testbed.bench.fidelity`` (root) builds two hosts on one switch (``--direct``: on one
direct link) and, reshaping them live, measures for every bandwidth x one-way delay: TCP
goodput by iperf3 (first second omitted) over the configured rate, and mean ping RTT minus the
configured round trip, with user-space timestamps (``ping -U``, what applications see) and
plain (kernel timestamps, what plain ping and tcpdump see), each against the tolerances of
testbed.net.fidelity (GOODPUT_RATIO, RTT_ERROR_MS, with their reasons). Plain ping is held to
what it should show where the delay is held (testbed.net.tc): the whole round trip through a
switch, one direction on a direct link under htb+nfqueue. Then the time of live changes
(bandwidth, delay, loss and all three) on that path and on a 4-host star (target <= 50 ms).
``--collectives`` re-runs the collectives benchmark (ours vs gloo) with its ranks inside the
hosts of a 4-host star at 10 and 100 Mbit/s.

``--self-shaped`` puts nodes that shape themselves (testbed.net.selfshape: two node servers in
plain namespaces on a bridge, no Mininet, shaped by Shape requests through the Orchestrator)
beside the Mininet-shaped pair, on the same profiles in one run (default: 20 and 100 Mbit/s x
5 and 25 ms): goodput ratio, RTT errors, and the time of live changes, for the self-shaped
nodes both the orchestrator's round trip of ``shape()`` and the nodes' own apply time.

Numbers depend on the machine's load: on 2 shared cores, the delay line and iperf3 compete with
everything else that runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.net.fidelity import GOODPUT_RATIO, RTT_ERROR_MS, goodput_ok, iperf_goodput, ping, rtt_ok, write_csv
from testbed.net.profile import LinkProfile

RATES_MBPS = (10, 20, 50, 100, 500, 1000)
DELAYS_MS = (0, 5, 20, 50)
SELF_SHAPED_RATES_MBPS = (20, 100)  # --self-shaped: a couple of profiles, a few minutes
SELF_SHAPED_DELAYS_MS = (5, 25)


@dataclass
class Cell:
    bandwidth_mbps: float
    delay_ms: float
    goodput_mbps: float
    goodput_ratio: float
    rtt_expected_ms: float
    rtt_ms: float  # ping -U
    rtt_error_ms: float
    rtt_plain_expected_ms: float
    rtt_plain_ms: float  # plain ping
    rtt_plain_error_ms: float

    @property
    def ok(self) -> bool:
        return goodput_ok(self.goodput_ratio) and rtt_ok(self.rtt_error_ms) and rtt_ok(self.rtt_plain_error_ms)


def fidelity_grid(em, rates, delays, seconds: float) -> list[Cell]:
    cells = []
    reply_seen = em.delay_point("h2", "h1") != "receiver"  # else plain ping misses the reply's delay
    for d in delays:
        for bw in rates:
            em.apply_profile(LinkProfile(bandwidth_mbps=bw, delay_ms=d))
            rtt = ping(em, "h1", "h2", count=30, interval_s=0.02).mean_ms  # idle link: no queueing delay
            plain = ping(em, "h1", "h2", count=30, interval_s=0.02, user_timestamps=False).mean_ms
            good = iperf_goodput(em, "h1", "h2", seconds=seconds + (2 if d >= 20 and bw >= 500 else 0))
            plain_exp = 2 * d if reply_seen else d
            cell = Cell(bw, d, good, good / bw, 2 * d, rtt, rtt - 2 * d, plain_exp, plain, plain - plain_exp)
            cells.append(cell)
            print(f"  {bw:>6g} Mbit/s {d:>3g} ms: goodput {good:8.2f} Mbit/s  ratio {cell.goodput_ratio:.3f}  "
                  f"RTT -U {rtt:7.2f} ms (error {cell.rtt_error_ms:+.2f})  plain {plain:7.2f} ms "
                  f"(expected {plain_exp:g}, error {cell.rtt_plain_error_ms:+.2f})  {'ok' if cell.ok else 'MISS'}",
                  flush=True)
    return cells


CHANGE_KINDS = {  # values alternate so every call changes something
    "bandwidth": lambda i: LinkProfile(bandwidth_mbps=50 if i % 2 else 100, delay_ms=10),
    "delay": lambda i: LinkProfile(bandwidth_mbps=100, delay_ms=5 if i % 2 else 10),
    "loss": lambda i: LinkProfile(bandwidth_mbps=100, delay_ms=10, loss_pct=1 if i % 2 else 0),
    "all three": lambda i: LinkProfile(bandwidth_mbps=50 if i % 2 else 100, delay_ms=5 if i % 2 else 10,
                                       loss_pct=1 if i % 2 else 0),
}


def change_times(em, repeats: int = 20) -> dict[str, list[float]]:
    """Seconds per live change, by what changes (values alternate so every call changes something)."""
    out = {}
    for name, make in CHANGE_KINDS.items():
        em.apply_profile(make(0))
        out[name] = [em.apply_profile(make(i)) for i in range(1, repeats + 1)]
    return out


def print_changes(label: str, times: dict[str, list[float]]) -> None:
    for name, ts in times.items():
        print(f"  {label:<22} {name:<10} {_spread(ts)}")


def _spread(ts: list[float]) -> str:
    ts = sorted(ts)
    p95 = ts[min(len(ts) - 1, int(0.95 * len(ts)))]
    return f"median {1e3 * statistics.median(ts):6.1f} ms   p95 {1e3 * p95:6.1f} ms   max {1e3 * ts[-1]:6.1f} ms"


class SelfShapedPair:
    """Two node servers that shape themselves, in plain namespaces h1 and h2 on a bridge
    (testbed.net.plainnet), reshaped live through the Orchestrator as ``Emulation.apply_profile``
    reshapes the Mininet pair: every direction gets the profile. The measuring functions of
    testbed.net.fidelity take it as they take an Emulation (the namespaces' ``ns_argv``,
    ``popen``, ``data_ip``, ``topology``)."""

    def __init__(self, log_dir: Path):
        from testbed.backends.launch import start_node
        from testbed.net.plainnet import PlainNet
        from testbed.node.orchestrator import Orchestrator
        from testbed.node.records import NodeAddress

        self.net = PlainNet(2, prefix="tbsb").start()
        self.orch = None
        self.node_apply_s: list[float] = []  # the slowest node's own apply time, per apply_profile
        try:
            addrs = []
            for h in self.net.hosts:
                proc, addr = start_node(f"{self.net.data_ip(h)}:50051", log_dir / f"{h}.log",
                                        prefix=self.net.ns_argv(h))
                self.net.procs.append(proc)
                addrs.append(NodeAddress(addr, addr))
            self.orch = Orchestrator(addrs)
            self.mechanism = "none"
        except BaseException:
            self.close()
            raise

    def __getattr__(self, name):  # ns_argv, popen, env, data_ip, topology: the namespaces'
        if name == "net":
            raise AttributeError(name)
        return getattr(self.net, name)

    def apply_profile(self, profile: LinkProfile) -> float:
        """Shape both directions with ``profile``; returns the orchestrator's round trip in seconds."""
        from testbed.net.plainnet import mesh
        from testbed.net.selfshape import topology_links

        topo = mesh(self.net.hosts, profile.to_dict())
        t0 = time.perf_counter()
        applied = self.orch.shape(topology_links(topo, {h: self.net.data_ip(h) for h in self.net.hosts}))
        seconds = time.perf_counter() - t0
        self.net.topology, self.mechanism = topo, self.orch.shape_mechanisms[0]
        self.node_apply_s.append(max(applied))
        return seconds

    def delay_point(self, src: str, dst: str) -> str:
        return "receiver"  # each node holds what it receives (testbed.net.selfshape)

    def close(self) -> None:
        if self.orch is not None:
            self.orch.shutdown("benchmark done")
        self.net.close()


def self_shaped_side_by_side(direct: bool, rates, delays, seconds: float, repeats: int) -> None:
    """The fidelity grid and live change times of the Mininet pair and of self-shaped nodes, on
    the same profiles, one after the other in this run; one table side by side."""
    import tempfile

    from testbed.net.emulation import Emulation

    with Emulation(pair_topology(direct)) as em:
        mn_held = em.delay_point("h1", "h2")
        print(f"Mininet pair, {'direct link' if direct else 'through a switch'} ({em.mechanism}, delay held: "
              f"{mn_held}):", flush=True)
        mn_cells = fidelity_grid(em, rates, delays, seconds)
        mn_changes = change_times(em, repeats)
    with tempfile.TemporaryDirectory(prefix="tbsb-logs-") as logs:
        pair = SelfShapedPair(Path(logs))
        try:
            print("self-shaped nodes (plain namespaces on a bridge, Shape through the orchestrator):", flush=True)
            ss_cells = fidelity_grid(pair, rates, delays, seconds)
            mechanism = pair.mechanism
            ss_changes, node_changes = {}, {}
            for name, make in CHANGE_KINDS.items():
                pair.apply_profile(make(0))
                first = len(pair.node_apply_s)
                ss_changes[name] = [pair.apply_profile(make(i)) for i in range(1, repeats + 1)]
                node_changes[name] = pair.node_apply_s[first:]
        finally:
            pair.close()

    def side(c: Cell) -> str:
        return (f"{c.goodput_mbps:8.2f} {c.goodput_ratio:6.3f} {c.rtt_error_ms:+8.2f} {c.rtt_plain_error_ms:+8.2f}"
                f" {'ok' if c.ok else 'MISS':>4}")

    print()
    print(f"fidelity side by side ({platform.node()}, {platform.release()}; one-way delay each direction; "
          f"RTT errors in ms, plain ping held to what it should show where the delay is held)")
    print(f"left: Mininet-shaped pair ({em.mechanism}, delay held: {mn_held}); right: self-shaped nodes "
          f"({mechanism}, delay held: receiver)")
    cols = f"{'goodput':>8} {'ratio':>6} {'RTT -U':>8} {'plain':>8} {'':>4}"
    print(f"{'Mbit/s':>7}{'ms':>7} | {cols} | {cols}")
    for m, n in zip(mn_cells, ss_cells):
        print(f"{m.bandwidth_mbps:7g}{m.delay_ms:7g} | {side(m)} | {side(n)}")
    print(f"ok: goodput ratio in {GOODPUT_RATIO[0]:g}-{GOODPUT_RATIO[1]:g}, |RTT error| <= {RTT_ERROR_MS:g} ms")
    print(f"live changes ({repeats} per kind): Mininet Emulation.apply_profile | self-shaped: Orchestrator.shape() "
          "round trip | the slower node's own apply")
    for name in CHANGE_KINDS:
        print(f"  {name:<10} Mininet   {_spread(mn_changes[name])}")
        print(f"  {'':<10} self rtt  {_spread(ss_changes[name])}")
        print(f"  {'':<10} self node {_spread(node_changes[name])}")


def run_collectives(bandwidths=(10, 100), sizes=("1K,16K,256K,1M", "1K,64K,1M,4M"), reps: int = 3) -> None:
    """The collectives benchmark (ours vs gloo) with its ranks in the hosts of a 4-host star.

    Both libraries' traffic crosses the shaped access links (star sweep: every host pair sees
    ``bandwidth`` Mbit/s); sizes are smaller than on loopback so a rep stays within seconds.
    """
    import subprocess

    from testbed.bench import collectives
    from testbed.net.emulation import Emulation
    from testbed.net.topology import load_topology

    with Emulation(load_topology("star")) as em:
        hosts = em.topology.host_names

        def launch(rank: int, argv: list[str]) -> subprocess.Popen:
            return em.popen(hosts[rank], argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True)

        for bw, size_text in zip(bandwidths, sizes):
            em.apply_profile(LinkProfile(bandwidth_mbps=bw))
            rows = collectives.run(len(hosts), collectives.parse_sizes(size_text), hosts=[em.data_ip(h) for h in hosts],
                                   reps=reps, launch=launch)
            print(f"# 4-host star, {bw:g} Mbit/s between any two hosts ({em.mechanism}), median of {reps} reps")
            print(collectives.format_table(rows))


def pair_topology(direct: bool):
    """Two hosts, each direction shaped once with the swept profile: on one direct link, or
    through a switch (h1's access link takes the profile both ways, h2's stays unshaped)."""
    from testbed.net.topology import topology_from_dict

    if direct:
        return topology_from_dict({"name": "pair", "hosts": ["h1", "h2"], "links": [{"a": "h1", "b": "h2"}]})
    return topology_from_dict({"name": "pair-switch", "hosts": ["h1", "h2"], "switches": ["s1"],
                               "links": [{"a": "h1", "b": "s1"}, {"a": "h2", "b": "s1", "sweep": "fixed"}]})


def main(argv: list[str] | None = None) -> int:
    from testbed.net.emulation import Emulation
    from testbed.net.probe import EmulationUnavailable
    from testbed.net.topology import load_topology

    ap = argparse.ArgumentParser(prog="python -m testbed.bench.fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", help=f"Mbit/s (default: {RATES_MBPS}; "
                    f"{SELF_SHAPED_RATES_MBPS} with --self-shaped)")
    ap.add_argument("--delays", type=float, nargs="+", help=f"one-way ms (default: {DELAYS_MS}; "
                    f"{SELF_SHAPED_DELAYS_MS} with --self-shaped)")
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 seconds per cell (+1 omitted)")
    ap.add_argument("--repeats", type=int, default=20, help="live changes timed per kind")
    ap.add_argument("--out", help="also write the grid as CSV here")
    ap.add_argument("--collectives", action="store_true", help="also run the collectives benchmark in a star")
    ap.add_argument("--direct", action="store_true", help="two hosts on one direct link instead of a switch")
    ap.add_argument("--self-shaped", action="store_true",
                    help="self-shaping nodes beside the Mininet pair, same profiles, one table")
    args = ap.parse_args(argv)
    if args.self_shaped:
        try:
            self_shaped_side_by_side(args.direct, args.rates or SELF_SHAPED_RATES_MBPS,
                                     args.delays or SELF_SHAPED_DELAYS_MS, args.seconds, args.repeats)
        except EmulationUnavailable as e:
            print(f"bench.fidelity: {e}", file=sys.stderr)
            return 2
        return 0
    args.rates, args.delays = args.rates or RATES_MBPS, args.delays or DELAYS_MS
    try:
        with Emulation(pair_topology(args.direct)) as em:
            print(f"fidelity of one emulated path, {'direct link' if args.direct else 'through a switch'} "
                  f"({em.mechanism}, delay held: {em.delay_point('h1', 'h2')}; {platform.node()}, "
                  f"{platform.release()})")
            cells = fidelity_grid(em, args.rates, args.delays, args.seconds)
            print("live changes (target <= 50 ms):")
            print_changes("one link", change_times(em, args.repeats))
        with Emulation(load_topology("star")) as em:
            print_changes("4-host star (8 links)", change_times(em, args.repeats))
    except EmulationUnavailable as e:
        print(f"bench.fidelity: {e}", file=sys.stderr)
        return 2
    ok = sum(c.ok for c in cells)
    print(f"{ok}/{len(cells)} cells within goodput ratio {GOODPUT_RATIO[0]:g}-{GOODPUT_RATIO[1]:g} and "
          f"|RTT error| <= {RTT_ERROR_MS:g} ms (ping -U and plain); goodput ratio range "
          f"{min(c.goodput_ratio for c in cells):.3f}-{max(c.goodput_ratio for c in cells):.3f}; "
          f"worst RTT error -U {max(abs(c.rtt_error_ms) for c in cells):.2f} ms, "
          f"plain {max(abs(c.rtt_plain_error_ms) for c in cells):.2f} ms")
    if args.out:
        write_csv(cells, Path(args.out), {"mechanism": em.mechanism})
    if args.collectives:
        print("collectives inside a 4-host star:")
        run_collectives()
    return 0


if __name__ == "__main__":
    sys.exit(main())
