"""Naming, run registry and clean-up of everything an emulation creates.

Every emulation run gets a 4-character id. Everything it creates in the root namespace is named
``tb<id>`` + a kind letter (h host, s switch, c control bridge, m shared-medium IFB), e.g.
bridge ``tbk3f9s0`` and its port ``tbk3f9s0-eth1``; every process it starts carries the
environment label ``TESTBED_NET_RUN=<id>`` (Mininet's own shells are recognised by their
``mininet:tb<id>...`` command line); device cgroups are named after their host. A registry
file /run/testbed-net/<id>.json records the owner process, so `testbed clean` removes the
leftovers of runs whose owner is gone and never touches a live run (unless told to) or
anything not named this way. The same sweep runs at the start of every Emulation, and a run's
keeper (testbed.net.keeper) runs it for its own run the moment the owner dies. Network namespaces are anonymous (Mininet's): they vanish with
their last process, and their veths, qdiscs and iptables rules with them.

What a run puts in the root namespace's iptables (the paths held in switches, see
testbed.net.tc) is its chain ``TBNET-<id>`` and the FORWARD rule that jumps to it; the root
NFQUEUE numbers it uses are recorded in its registry file (``claim_queues``: queues are shared
by every run in the root namespace). Holding delay in a switch needs bridged frames to pass
iptables (``net.bridge.bridge-nf-call-iptables`` = 1). Where the knob was 0, the run that sets
it leaves a record (/run/testbed-net/bridge-nf-call-iptables.was-0), and the clean-up that
finds no other live run sets it back to 0: the last run alive puts it back, whichever way it
ends (teardown, keeper, or the next start's sweep). Runs that find it 1 leave it alone.

Self-shaping nodes (testbed.net.selfshape) clean up after themselves, and a guard process
does it for a node killed outright. What a node that died with its guard left is found by a
sweep (no run id): its registry file /run/testbed-net/self-<pid>.json names its namespace
(entered if it still exists) and what to undo there; a chain ``TBSELF-<pid>`` of a dead pid in
this namespace's iptables is removed even without one. Live nodes are never touched.

``main`` is the `testbed clean` command.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_DIR = Path("/run/testbed-net")
ENV_TAG = "TESTBED_NET_RUN"
_ID = "[a-z0-9]{4}"
LINK_RE = re.compile(rf"^tb({_ID})(?:[hsc]\d*|m\d+)(?:-eth\d+)?(?:@.*)?$")
SHELL_RE = re.compile(rf"mininet:tb({_ID})")
CGROUP_RE = re.compile(rf"^tb({_ID})h\d+$")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CHAIN_PREFIX = "TBNET-"  # + run id: the run's chain in the root namespace (hooked from FORWARD)
CHAIN_RE = re.compile(rf"^{CHAIN_PREFIX}({_ID})$")
SELF_CHAIN_RE = re.compile(r"^TBSELF-(\d+)[a-z]?$")  # a self-shaping node's chain (testbed.net.selfshape)
IPT = "iptables-legacy"  # as testbed.net.tc.IPT (tc imports nothing of the run's naming)
BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
BRIDGE_NF_RECORD = REGISTRY_DIR / "bridge-nf-call-iptables.was-0"
QUEUE_NUMBERS = 65536  # NFQUEUE numbers are 16 bits


@contextmanager
def _root_lock():
    """Serialises what runs share in the root namespace (queue numbers, the bridge knob)."""
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY_DIR / "root.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _start_time(pid: int) -> str | None:
    """Kernel start time of a process (guards against pid reuse), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Run:
    """One emulation run: its id and registry entry (owner = the process that built it)."""

    run_id: str
    owner_pid: int = field(default_factory=os.getpid)

    @classmethod
    def create(cls, topology: str = "") -> "Run":
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        rng = random.SystemRandom()
        while True:
            run_id = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(4))
            path = REGISTRY_DIR / f"{run_id}.json"
            try:
                with open(path, "x") as f:  # atomic claim of the id
                    json.dump({"run_id": run_id, "owner_pid": os.getpid(), "owner_start": _start_time(os.getpid()),
                               "topology": topology, "created": time.time()}, f)
                return cls(run_id)
            except FileExistsError:
                continue

    def name(self, kind: str, index: int | None = None) -> str:
        return f"tb{self.run_id}{kind}{'' if index is None else index}"

    @property
    def chain(self) -> str:
        return f"{CHAIN_PREFIX}{self.run_id}"

    def claim_queues(self, count: int) -> int:
        """The first of ``count`` root-namespace NFQUEUE numbers no live run uses, recorded in
        this run's registry file (freed with it)."""
        path = REGISTRY_DIR / f"{self.run_id}.json"
        with _root_lock():
            used = sorted(tuple(reg["queues"]) for reg in _live_registries(self.run_id) if "queues" in reg)
            base = 0
            for first, n in used:
                if base + count <= first:
                    break
                base = max(base, first + n)
            if base + count > QUEUE_NUMBERS:
                raise RuntimeError(f"no {count} free NFQUEUE numbers in the root namespace (live runs use {used})")
            reg = json.loads(path.read_text())
            reg["queues"] = [base, count]
            tmp = REGISTRY_DIR / f".{self.run_id}.tmp"
            tmp.write_text(json.dumps(reg))
            os.replace(tmp, path)
        return base

    def forget(self) -> None:
        (REGISTRY_DIR / f"{self.run_id}.json").unlink(missing_ok=True)


def _live_registries(other_than: str | None = None) -> list[dict]:
    out = []
    for p in REGISTRY_DIR.glob("*.json"):
        if p.stem != other_than and run_alive(p.stem):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                pass
    return out


def bridge_netfilter_on() -> None:
    """Make bridged frames pass iptables; record it where the testbed changed the knob."""
    with _root_lock():
        if BRIDGE_NF.read_text().strip() != "1":
            BRIDGE_NF_RECORD.write_text("0\n")  # what it was: the last run alive puts it back
            BRIDGE_NF.write_text("1\n")


def _restore_bridge_netfilter(ending: str | None) -> bool:
    """Put the knob back to 0 where the testbed set it and no run but ``ending`` is alive."""
    with _root_lock():
        if not BRIDGE_NF_RECORD.exists() or _live_registries(ending):
            return False
        BRIDGE_NF.write_text("0\n")
        BRIDGE_NF_RECORD.unlink()
        return True


def run_alive(run_id: str) -> bool:
    """True while the process that owns the run is alive (same pid and start time)."""
    try:
        reg = json.loads((REGISTRY_DIR / f"{run_id}.json").read_text())
    except (OSError, ValueError):
        return False
    return _start_time(int(reg["owner_pid"])) == reg.get("owner_start")


@dataclass
class Leftovers:
    links: list[str] = field(default_factory=list)  # bridges, IFBs, root-side veths
    processes: list[tuple[int, str]] = field(default_factory=list)  # (pid, command line)
    cgroups: list[Path] = field(default_factory=list)
    registries: list[Path] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # root iptables: "-N <chain>" and the rules jumping to it
    nodes: list[Path] = field(default_factory=list)  # registry files of dead self-shaping nodes

    def empty(self) -> bool:
        return not (self.links or self.processes or self.cgroups or self.registries or self.rules or self.nodes)

    def describe(self) -> str:
        """One line; bridges and IFBs named before ports (``-eth``), which vanish with their namespace anyway."""
        shown = sorted(self.links, key=lambda n: ("-eth" in n, n))[:6]
        parts = [f"{len(self.links)} links ({', '.join(shown)}{'...' if len(self.links) > 6 else ''})",
                 f"{len(self.processes)} processes", f"{len(self.cgroups)} cgroups",
                 f"{len(self.registries)} registry files", f"{len(self.rules)} root iptables chains and hooks"]
        if self.nodes:
            parts.append(f"what {len(self.nodes)} dead self-shaping nodes left")
        return ", ".join(parts)


def _process_run(pid: int) -> tuple[str, str] | None:
    """(run id, command line) if the process was started by an emulation run."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    m = SHELL_RE.search(cmdline)
    if m:
        return m.group(1), cmdline
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    tag = f"{ENV_TAG}=".encode()
    for item in env:
        if item.startswith(tag):
            return item[len(tag):].decode(errors="replace"), cmdline
    return None


def find_leftovers(run_id: str | None = None, include_live: bool = False) -> Leftovers:
    """What emulation runs left in this machine: of one run, or of every run that is not alive."""
    def wanted(rid: str) -> bool:
        return rid == run_id if run_id is not None else (include_live or not run_alive(rid))

    out = Leftovers()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0] if ":" in line else ""
        m = LINK_RE.match(name)
        if m and wanted(m.group(1)):
            out.links.append(name)
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            found = _process_run(int(entry.name))
            if found and wanted(found[0]):
                out.processes.append((int(entry.name), found[1]))
    for base in [CGROUP_ROOT] + [CGROUP_ROOT / c for c in ("cpu", "cpuset", "memory")]:
        if base.is_dir():
            out.cgroups += [p for p in base.iterdir() if (m := CGROUP_RE.match(p.name)) and wanted(m.group(1))]
    if REGISTRY_DIR.is_dir():
        out.registries = [p for p in REGISTRY_DIR.glob("*.json") if wanted(p.stem)]
    out.rules = _root_rules(wanted, dead_nodes=run_id is None)
    if run_id is None:
        from testbed.net.selfshape import dead_node_records

        out.nodes = [p for p, _reg in dead_node_records(REGISTRY_DIR)]
    return out


def _root_rules(wanted, dead_nodes: bool = False) -> list[str]:
    try:
        listing = subprocess.run([IPT, "-w", "-S"], capture_output=True, text=True).stdout
    except OSError:  # no iptables: no rules either
        return []
    return run_rules(listing, wanted) + (dead_node_rules(listing) if dead_nodes else [])


def dead_node_rules(listing: str, alive=lambda pid: Path(f"/proc/{pid}").exists()) -> list[str]:
    """The lines of an ``iptables -S`` listing that create or jump to the chain of a self-shaping
    node whose process is gone (``TBSELF-<pid>``)."""
    out = []
    for line in listing.splitlines():
        words = line.split()
        target = words[-1] if len(words) > 2 and words[-2] == "-j" else words[1] if words[:1] == ["-N"] else ""
        m = SELF_CHAIN_RE.match(target)
        if m and not alive(int(m.group(1))) and (words[0] == "-N" or words[1] != target):
            out.append(line)
    return out


def run_rules(listing: str, wanted) -> list[str]:
    """The lines of an ``iptables -S`` listing that create a wanted run's chain or jump to it
    (the chain's own rules go with it)."""
    out = []
    for line in listing.splitlines():
        words = line.split()
        target = words[-1] if len(words) > 2 and words[-2] == "-j" else words[1] if words[:1] == ["-N"] else ""
        m = CHAIN_RE.match(target)
        if m and wanted(m.group(1)) and (words[0] == "-N" or words[1] != target):
            out.append(line)
    return out


def _remove_rules(lines: list[str]) -> None:
    """Unhook first, then flush and delete the chains (a chain still jumped to cannot be deleted)."""
    hooks = [ln.split() for ln in lines if not ln.startswith("-N ")]
    chains = [ln.split()[1] for ln in lines if ln.startswith("-N ")]
    argvs = [["-D"] + w[1:] for w in hooks] + [[op, c] for c in chains for op in ("-F", "-X")]
    for argv in argvs:
        subprocess.run([IPT, "-w"] + argv, capture_output=True)


def stop_process(p: subprocess.Popen, grace_s: float = 2.0) -> None:
    """SIGTERM a process the testbed started, SIGKILL after ``grace_s``; reap it, close its pipes."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            f.close()


def kill_pids(pids: list[int], grace_s: float = 1.0) -> None:
    """SIGTERM, up to ``grace_s`` to exit (0: none, SIGKILL at once), then SIGKILL; waits until they are gone."""
    steps = ([(signal.SIGTERM, grace_s)] if grace_s > 0 else []) + [(signal.SIGKILL, 1.0)]
    for sig, wait_s in steps:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_start_time(p) is not None and _state(p) != "Z" for p in pids):
            time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def clean(run_id: str | None = None, include_live: bool = False, grace_s: float = 1.0) -> Leftovers:
    """Remove leftovers (see find_leftovers); returns what was found and removed. Processes get
    ``grace_s`` seconds to exit after SIGTERM before SIGKILL (0: SIGKILL at once)."""
    found = find_leftovers(run_id, include_live)
    kill_pids([pid for pid, _ in found.processes], grace_s)
    if found.links:  # one batch; -force goes on past a veth already gone with its peer or namespace
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"link del {n}\n" for n in found.links),
                       capture_output=True, text=True)
    for g in found.cgroups:
        for _ in range(20):
            try:
                g.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
    if found.nodes:
        from testbed.net.selfshape import clean_dead_nodes

        clean_dead_nodes(REGISTRY_DIR)  # before the chains below: it also removes their qdiscs
    _remove_rules(found.rules)
    for p in found.registries:
        p.unlink(missing_ok=True)
    if BRIDGE_NF_RECORD.exists():
        _restore_bridge_netfilter(run_id)
    return found


def main(argv: list[str]) -> int:
    """`testbed clean [--all] [--run ID] [--dry-run]`."""
    ap = argparse.ArgumentParser(
        prog="testbed clean",
        description="Remove leftovers of crashed emulation runs: their processes (node servers, delay lines, "
                    "Mininet shells) and with them their namespaces, veths, qdiscs and iptables rules; their "
                    "bridges, IFB devices, cgroups, registry files and root-namespace iptables chains "
                    "(TBNET-<id>); net.bridge.bridge-nf-call-iptables back to 0 if the testbed set it and no run "
                    "is left; what dead self-shaping nodes left (qdiscs, chains TBSELF-<pid>, in namespaces "
                    "that still exist). Runs whose owner is still alive are left alone unless --all is given. Nothing not named by the testbed is touched.")
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
