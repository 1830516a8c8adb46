"""`testbed doctor`: what this machine can emulate, and why (every feature is tried, not assumed)."""

from __future__ import annotations

import argparse
import textwrap

from testbed.net.cgroups import host_cpus
from testbed.net.probe import FIX, probe

EXPLAIN = {
    "htb+netem": "bandwidth by htb on each link's egress; delay, jitter and loss by netem beneath it",
    "htb+nfqueue": "bandwidth by htb on each link's egress; delay and jitter by a user-space delay line on "
                   "NFQUEUE, one queue per path, loss by iptables' statistic match just before it; jitter never "
                   "reorders a path. Paths that cross a switch are held where the bridge forwards them to the "
                   "receiver (root namespace, br_netfilter FORWARD hook): every tool inside the hosts sees the "
                   "delay, plain ping and tcpdump included. Direct host-to-host links (mesh) have no such point "
                   "and are held on the RECEIVING host's INPUT hook: TCP and `ping -U` see the delay, plain "
                   "ping and tcpdump on the receiver do not (the kernel timestamps a packet before INPUT). "
                   "Never on the sender: held packets would stall TCP through TCP small queues",
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="testbed doctor", description=__doc__)
    ap.add_argument("experiment", nargs="?", help="also say how this experiment would use the host's cores "
                    "(time dilation)")
    return ap


def main(argv: list[str]) -> int:
    parser().parse_args(argv)
    return report()


def report() -> int:
    """Print what the kernel offers; 0 when Mininet emulation works here."""
    caps = probe(full=True)
    width = max(len(c.name) for c in caps.checks)
    for c in caps.checks:
        print(f"  [{'ok' if c.ok else '--'}] {c.name:<{width}}  {c.detail}")
    mech = caps.mechanism
    bad = caps.missing_for_emulation()
    if bad or mech is None:
        print("\nMininet emulation: NOT available here.")
        print(f"Fix: {FIX}")
        return 1
    print(f"\nMininet emulation: available. Link shaping mechanism: {mech}")
    print(textwrap.fill(EXPLAIN[mech], width=100, initial_indent="  ", subsequent_indent="  "))
    if not caps.ok("ifb"):
        print("  shared-medium topologies need IFB devices, which are missing")
    if not caps.ok("cgroups"):
        print("  device profiles (speed, threads, memory_mb) and time dilation need cgroups, which are missing")
    cores = len(host_cpus())
    print(f"\nCores for emulated devices: {cores}. An experiment whose nodes need more (sum of speed x threads) "
          "contends for them unless it runs time-dilated (`emulation: {time_dilation: auto}`, the default).")
    return 0
