"""`testbed clean`: remove what crashed emulation runs left behind (see testbed.net.cleanup)."""

from __future__ import annotations

import argparse
import os
import sys

from testbed.net.cleanup import clean, find_leftovers


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="testbed clean",
        description="Remove leftovers of crashed emulation runs: their processes (node servers, delay lines, "
                    "Mininet shells) and with them their namespaces, veths, qdiscs and iptables rules; their "
                    "bridges, IFB devices, cgroups and registry files. Runs whose owner is still alive are left "
                    "alone unless --all is given. Nothing not named by the testbed is touched.")
    ap.add_argument("--all", action="store_true", help="also remove runs whose owner process is still alive")
    ap.add_argument("--run", help="only this run id (4 characters, as in bridge tb<id>s0)")
    ap.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("testbed clean: needs root (it removes network devices and processes); run `sudo testbed clean`",
              file=sys.stderr)
        return 2
    found = find_leftovers(args.run, args.all) if args.dry_run else clean(args.run, args.all)
    verb = "would remove" if args.dry_run else "removed"
    if found.empty():
        print("testbed clean: nothing to remove")
        return 0
    print(f"testbed clean: {verb} {found.describe()}")
    for pid, cmd in found.processes:
        print(f"  process {pid}: {cmd[:100]}")
    for p in found.cgroups:
        print(f"  cgroup {p}")
    return 0
