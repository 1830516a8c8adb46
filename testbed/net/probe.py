"""Capability probe: what this machine can emulate, and why not where it cannot.

Every kernel feature is tried, not read from a config file: each probe runs in a throwaway
network namespace (``unshare -n``), so it leaves nothing behind and cannot disturb live links.
testbed.net.emulation uses ``probe()`` to pick the shaping mechanism; ``testbed doctor`` prints it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import TestbedError

TOOLS = ("mnexec", "ip", "tc", "iptables-legacy", "iptables-legacy-restore", "unshare", "iperf3", "ping")
FIX = ("run as root: `sudo make setup` installs Mininet, iproute2, iptables and iperf3, then "
       "`sudo make test` / `sudo .venv/bin/testbed ...`. Without root, use the loopback backend "
       "(`backend: loopback`: real gRPC between local processes, no link shaping).")


class EmulationUnavailable(TestbedError):
    """This machine (or this user) cannot run Mininet emulation; the message says how to fix it."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Capabilities:
    checks: list[Check] = field(default_factory=list)

    def ok(self, name: str) -> bool:
        return any(c.name == name and c.ok for c in self.checks)

    @property
    def mechanism(self) -> str | None:
        """The link-shaping mechanism this machine supports best, or None."""
        if not ((self.ok("root") or self.ok("net_admin")) and self.ok("htb")):
            return None
        if self.ok("netem"):
            return "htb+netem"
        if self.ok("nfqueue"):
            return "htb+nfqueue"
        return None

    def missing_for_emulation(self) -> list[Check]:
        """Checks that must pass before a Mininet backend can start."""
        need = ["root", "tools", "mininet", "bridge", "htb"]
        bad = [c for c in self.checks if c.name in need and not c.ok]
        if self.mechanism is None and not bad:
            bad = [c for c in self.checks if c.name in ("netem", "nfqueue")]
        return bad

    def require(self, mechanism: str = "auto") -> str:
        """The mechanism to use (``auto``: the best one); raises EmulationUnavailable otherwise."""
        bad = self.missing_for_emulation()
        if bad:
            why = "; ".join(f"{c.name}: {c.detail}" for c in bad)
            raise EmulationUnavailable(f"Mininet emulation is not available here ({why}). Fix: {FIX}")
        if mechanism == "auto":
            return self.mechanism  # type: ignore[return-value]
        need = "netem" if mechanism == "htb+netem" else "nfqueue"
        if not self.ok(need):
            raise EmulationUnavailable(f"mechanism {mechanism!r} needs {need}, which this machine lacks: "
                                       f"{next(c.detail for c in self.checks if c.name == need)}")
        return mechanism


def _in_fresh_netns(script: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Run a shell script in a new, empty network namespace; (succeeded, output)."""
    try:
        p = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up; " + script],
                           capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return p.returncode == 0, (p.stdout + p.stderr).strip()


def _tool_check() -> Check:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    return Check("tools", not missing, "all found" if not missing else f"missing {', '.join(missing)}")


def _mininet_check() -> Check:
    try:
        import mininet.net  # noqa: F401

        return Check("mininet", True, f"Python API {mininet.net.VERSION}")
    except ImportError as e:
        return Check("mininet", False, f"Python API not importable ({e})")


def _kernel_check(name: str, script: str, ok_detail: str) -> Check:
    ok, out = _in_fresh_netns(script)
    return Check(name, ok, ok_detail if ok else (out.splitlines()[-1] if out else "failed"))


def _nfqueue_check() -> Check:
    """Bind an NFQUEUE queue and see a packet arrive on it (iptables-legacy, in a fresh netns)."""
    code = ("import socket,select,subprocess as sp;from testbed.net.nfqueue import NfQueueSocket as S;"
            "s=S();s.bind(7);"
            "sp.run(['iptables-legacy','-A','OUTPUT','-p','udp','-j','NFQUEUE','--queue-num','7'],check=True);"
            "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.sendto(b'x',('127.0.0.1',9));"
            "select.select([s],[],[],2);p=list(s.packets());assert p,'no packet reached the queue';"
            "s.accept_upto(7,p[-1][1]);print('ok')")
    ok, out = _in_fresh_netns(f"{sys.executable} -c \"{code}\"")
    root = str(Path(__file__).resolve().parents[2])
    if not ok and "No module named 'testbed'" in out:
        ok, out = _in_fresh_netns(f"cd {root} && {sys.executable} -c \"{code}\"")
    return Check("nfqueue", ok, "iptables-legacy NFQUEUE delivers packets to user space" if ok
                 else (out.splitlines()[-1] if out else "failed"))


def _cgroup_check() -> Check:
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        ctl = (base / "cgroup.controllers").read_text().split()
        ok = {"cpu", "cpuset", "memory"} <= set(ctl)
        return Check("cgroups", ok, f"cgroup v2, controllers: {' '.join(ctl)}")
    have = [c for c in ("cpu", "cpuset", "memory") if (base / c).is_dir()]
    ok = len(have) == 3
    return Check("cgroups", ok, f"cgroup v1: {', '.join(have) or 'none'} mounted"
                 + ("" if ok else " (device profiles need cpu, cpuset and memory)"))


def _bridge_netfilter_check() -> Check:
    """Bridged frames pass the root namespace's iptables when bridge-nf-call-iptables is 1."""
    knob = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not knob.exists() or knob.read_text().strip() != "1":
        return Check("bridge-netfilter", True, "bridged frames bypass the root iptables (an htb+nfqueue run whose "
                     "paths cross a switch sets net.bridge.bridge-nf-call-iptables to 1 and the last run puts it back)")
    p = subprocess.run(["iptables-legacy", "-S", "FORWARD"], capture_output=True, text=True)
    policy_drop = "-P FORWARD DROP" in p.stdout
    return Check("bridge-netfilter", not policy_drop,
                 "bridged frames pass the root FORWARD chain, whose policy is DROP: emulated hosts "
                 "cannot talk over a switch unless the run accepts its bridged frames itself (htb+nfqueue "
                 "runs do; htb+netem runs need `sysctl net.bridge.bridge-nf-call-iptables=0` or an ACCEPT)"
                 if policy_drop else "bridged frames pass the root FORWARD chain (policy ACCEPT: fine)")


CAP_NET_ADMIN = 12  # bit of CapEff in /proc/<pid>/status (linux/capability.h)


def has_net_admin(status_text: str | None = None) -> bool:
    """Whether this process may shape links: CAP_NET_ADMIN in its *effective* capabilities.

    Read from /proc/self/status (``status_text``: its content, for tests), not guessed from the
    uid: root in a container or under ``capsh --drop=cap_net_admin`` lacks it, and a non-root
    process started with it (``setcap``, a pod's NET_ADMIN) has it."""
    if status_text is None:
        try:
            status_text = Path("/proc/self/status").read_text()
        except OSError:
            return False
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def probe_node() -> Capabilities:
    """What a node shaping its own namespace (testbed.net.selfshape) can use: CAP_NET_ADMIN,
    tc and iptables, and the kernel's htb, netem, IFB and NFQUEUE.

    The kernel features are tried as ``probe`` tries them, in a throwaway namespace, where the
    node may make one (root); a node that may not (CAP_NET_ADMIN alone, e.g. a container) tries
    htb, netem and IFB on a throwaway IFB device of its own namespace, and takes NFQUEUE as
    present when iptables-legacy is (its first Shape says so if it is not).
    """
    caps = Capabilities()
    admin = has_net_admin()
    caps.checks.append(Check("net_admin", admin, "CAP_NET_ADMIN in the effective capabilities" if admin else
                             "no CAP_NET_ADMIN: start the node as root or with NET_ADMIN to shape its links"))
    missing = [t for t in ("ip", "tc", "iptables-legacy", "iptables-legacy-restore") if shutil.which(t) is None]
    caps.checks.append(Check("tools", not missing, "all found" if not missing else f"missing {', '.join(missing)}"))
    if not admin or shutil.which("tc") is None:
        return caps
    if _in_fresh_netns("true")[0]:
        caps.checks.append(_kernel_check("htb", "tc qdisc add dev lo root handle 1: htb", "sch_htb"))
        caps.checks.append(_kernel_check("netem", "tc qdisc add dev lo root netem delay 1ms", "sch_netem"))
        caps.checks.append(_kernel_check("ifb", "ip link add tbprobe0 type ifb && ip link set tbprobe0 up", "IFB"))
        if shutil.which("iptables-legacy"):
            caps.checks.append(_nfqueue_check())
        return caps
    dev = f"tbprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "link", "add", dev, "type", "ifb"], capture_output=True, text=True)
    caps.checks.append(Check("ifb", made.returncode == 0, "IFB" if made.returncode == 0 else made.stderr.strip()))
    if made.returncode == 0:
        for name, qdisc in (("htb", ["htb"]), ("netem", ["netem", "delay", "1ms"])):
            p = subprocess.run(["tc", "qdisc", "add", "dev", dev, "root"] + qdisc, capture_output=True, text=True)
            caps.checks.append(Check(name, p.returncode == 0, f"sch_{name}" if p.returncode == 0 else p.stderr.strip()))
            subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
    else:
        caps.checks.append(Check("htb", True, "untried (no IFB device to try it on); the first Shape says"))
    ok = shutil.which("iptables-legacy") is not None
    caps.checks.append(Check("nfqueue", ok, "untried (no namespace of its own to try it in)" if ok else
                             "iptables-legacy not found"))
    return caps


def probe(full: bool = True) -> Capabilities:
    """Try everything. ``full=False`` skips what only `doctor` needs (cgroups, bridge netfilter)."""
    caps = Capabilities()
    root = os.geteuid() == 0
    caps.checks.append(Check("root", root, "running as root" if root else
                             "not root: namespaces, tc and iptables need root"))
    caps.checks.append(_tool_check())
    caps.checks.append(_mininet_check())
    if root and shutil.which("unshare") and shutil.which("tc"):
        caps.checks.append(_kernel_check("bridge", "ip link add tbprobe0 type bridge",
                                         "Linux bridge (Mininet LinuxBridge-style switches)"))
        caps.checks.append(_kernel_check("htb", "tc qdisc add dev lo root handle 1: htb",
                                         "sch_htb: bandwidth shaping"))
        caps.checks.append(_kernel_check("netem", "tc qdisc add dev lo root netem delay 1ms",
                                         "sch_netem: delay, jitter and loss in the kernel"))
        caps.checks.append(_kernel_check("ifb", "ip link add tbprobe0 type ifb && ip link set tbprobe0 up",
                                         "IFB devices (shared-medium bottlenecks)"))
        if shutil.which("iptables-legacy"):
            caps.checks.append(_nfqueue_check())
    if full:
        caps.checks.append(_cgroup_check())
        if root and shutil.which("iptables-legacy"):
            caps.checks.append(_bridge_netfilter_check())
    return caps
