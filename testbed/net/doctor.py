"""`testbed doctor`: what this machine can emulate, and why (every feature is tried, not assumed)."""

from __future__ import annotations

import argparse

from testbed.net.probe import FIX, probe

EXPLAIN = {
    "htb+netem": "bandwidth by htb on each link's egress; delay, jitter and loss by netem beneath it",
    "htb+nfqueue": "bandwidth by htb on each link's egress; delay and jitter by a user-space delay line on "
                   "NFQUEUE on the RECEIVING host, per source host (held on the sender, packets would stall "
                   "TCP through TCP small queues); loss by iptables' statistic match on the receiving host; "
                   "jitter never reorders a path",
}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="testbed doctor", description=__doc__)
    ap.parse_args(argv)
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
    print(f"  {EXPLAIN[mech]}")
    if not caps.ok("ifb"):
        print("  shared-medium topologies need IFB devices, which are missing")
    if not caps.ok("cgroups"):
        print("  device profiles (cpu_share, threads, memory_mb) need cgroups, which are missing")
    return 0
