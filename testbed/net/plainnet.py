"""Plain network namespaces on one Linux bridge, made with iproute2 (no Mininet, no shaping).

Where self-shaping nodes (testbed.net.selfshape) are tested and benchmarked: each host is a
named namespace (``ip netns add``) with one veth ``eth0`` on a bridge in the root namespace,
which also holds an address, so processes of the root namespace (the orchestrator) reach every
host. Nothing shapes these links; the nodes started inside shape themselves.

Names carry a prefix and a random 4-character id (namespaces ``<prefix>-<id>-h1``, bridge
``<prefix>-<id>``, root-side veths ``<prefix>-<id>-1``), so several sets on one machine never
collide, and none looks like an emulation run's (testbed.net.cleanup leaves them alone).
``close()`` stops every process started in the namespaces and removes namespaces, veths and
bridge, whatever state the set-up reached; it runs on leaving a ``with`` block.

The measuring functions of testbed.net.fidelity take a PlainNet as they take an Emulation:
``ns_argv``, ``popen``, ``env``, ``data_ip`` and a ``topology`` (a mesh of the hosts, whose
profiles say what the links should deliver once the nodes shaped them).
"""

from __future__ import annotations

import os
import random
import string
import subprocess
from pathlib import Path

from testbed.errors import check
from testbed.net.cleanup import kill_pids, stop_process
from testbed.net.topology import Topology, topology_from_dict


class PlainNet:
    def __init__(self, n_hosts: int, prefix: str = "tbss"):
        check(isinstance(n_hosts, int) and 1 <= n_hosts <= 99, "n_hosts", n_hosts, "an integer in 1..99")
        check(isinstance(prefix, str) and 1 <= len(prefix) <= 4 and prefix.isalnum(), "prefix", prefix,
              "1-4 letters or digits (interface names have 15 characters)")
        self.id = "".join(random.SystemRandom().choice(string.ascii_lowercase + string.digits) for _ in range(4))
        self.prefix = f"{prefix}-{self.id}"
        self.hosts = [f"h{i + 1}" for i in range(n_hosts)]
        self.bridge = self.prefix
        self.subnet = ""
        self.procs: list[subprocess.Popen] = []
        self.topology: Topology = mesh(self.hosts)
        self._made: list[str] = []  # namespaces made so far

    # -- names ------------------------------------------------------------------------------
    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def data_ip(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    @property
    def root_ip(self) -> str:
        """The root namespace's address on the bridge."""
        return f"{self.subnet}.254"

    def ns_argv(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns(host)]

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "PlainNet":
        try:
            self.subnet = _free_subnet()
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{self.root_ip}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for i, h in enumerate(self.hosts):
                ns, veth = self.netns(h), f"{self.prefix}-{i + 1}"
                _run(["ip", "netns", "add", ns])
                self._made.append(ns)
                _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
                _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.data_ip(h)}/24", "dev", "eth0"])
                _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(self.ns_argv(h) + ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                        "net.ipv6.conf.default.disable_ipv6=1"])
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> "PlainNet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process in the namespaces, then remove namespaces, veths and bridge. Idempotent."""
        for p in self.procs:
            stop_process(p, grace_s=5.0)
        self.procs = []
        for ns in self._made:
            kill_pids(self.pids(ns), grace_s=3.0)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    # -- processes ------------------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return dict(base if base is not None else os.environ)

    def popen(self, host: str, argv: list[str], device: bool = False, **kwargs) -> subprocess.Popen:
        """Start a process in ``host``'s namespace (stopped by close()). ``device`` is accepted
        for testbed.net.fidelity's sake: there are no device cgroups here."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("cwd", str(Path(__file__).resolve().parents[2]))
        proc = subprocess.Popen(self.ns_argv(host) + argv, env=self.env(kwargs.pop("env", None)), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], timeout_s: float = 30.0) -> str:
        """Run a command in ``host``'s namespace; its stdout (raises on failure)."""
        return _run(self.ns_argv(host) + argv, timeout_s=timeout_s)

    def pids(self, ns: str) -> list[int]:
        """Processes living in namespace ``ns`` (by name)."""
        p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(x) for x in p.stdout.split()]


def mesh(hosts: list[str], profile: dict | None = None) -> Topology:
    """A full mesh of ``hosts``, every direction with ``profile`` (LinkProfile fields)."""
    links = [{"a": a, "b": b, "profile": dict(profile or {})} for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    return topology_from_dict({"name": "plain-mesh", "hosts": list(hosts), "links": links})


def _run(argv: list[str], timeout_s: float = 30.0) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return p.stdout


def _free_subnet() -> str:
    """A 10.x.y.0/24 that no route of the root namespace uses."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    rng = random.SystemRandom()
    while True:
        net = f"10.{rng.randrange(200, 250)}.{rng.randrange(256)}"
        if f"{net}." not in used:
            return net


