"""What a node says about the machine it runs on: versions, host, CPU, and its data interface's counters.

A node on a real device reports these in every Stats reply (testbed.node.records.NodeStats):
the orchestrator checks the package and protocol versions against its own, the run's manifest
records the host name, kernel, CPU model and core count, and the byte counters of the
interface that carries the node's data address give the bytes on the wire.

The interface is the one holding the data address (``ip -o addr show to ADDR``), else the one
the kernel routes it through (``ip -o route get``: 127.0.0.5 goes through ``lo`` without being
its address); without iproute2, the interface whose IPv4 network holds the address (its
primary address and netmask). Counters are read from
``/sys/class/net/IFACE/statistics/{tx,rx}_bytes`` (since the interface came up; every
process on the host and every protocol, the control plane included).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import platform
import socket
import struct
import subprocess
from importlib import metadata
from pathlib import Path

SYS_NET = Path("/sys/class/net")


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    """The installed testbed package's version ("" if it is not installed, e.g. run from a bare checkout)."""
    try:
        return metadata.version("testbed")
    except metadata.PackageNotFoundError:
        return ""


@functools.lru_cache(maxsize=1)
def host_info() -> dict:
    """hostname, kernel, cpu_model, cpu_count of this machine."""
    u = platform.uname()
    return {"hostname": socket.gethostname(), "kernel": f"{u.system} {u.release} {u.version}",
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count() or 0}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name: x86's ``model name``, else an ARM board's ``Model`` / ``Hardware`` line, else
    what platform knows."""
    try:
        lines = Path(cpuinfo).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for ln in lines:
        key, sep, val = ln.partition(":")
        if sep and val.strip():
            fields.setdefault(key.strip().lower(), val.strip())
    for key in ("model name", "model", "hardware", "cpu model", "processor"):
        v = fields.get(key, "")
        if v and not v.isdigit():  # x86's `processor : 0` is an index
            return v
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def net_id() -> str:
    """This machine's id and this process's network namespace (``MACHINE-ID:NETNS-INODE``): two nodes
    reporting the same net_id and interface read the same counters (nodes on one host's loopback),
    two devices that merely share a host name (every Pi is `raspberrypi`) do not."""
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            machine = Path(path).read_text().strip()
            break
        except OSError:
            continue
    try:
        ns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        ns = ""
    return f"{machine or socket.gethostname()}:{ns}"


@functools.lru_cache(maxsize=16)
def data_interface(host: str) -> str:
    """The network interface carrying ``host`` (an IP of this machine, or one it routes to); "" if unknown.

    Looked up once per host: the lookup forks ``ip``, and a fork marks every page of a node holding
    a model copy-on-write, which the next inference pays for in page faults (tens of ms)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            return ""
    if ip.is_unspecified:
        return ""
    try:  # the interface holding the address (a route to one's own address says `lo`) ...
        owner = subprocess.run(["ip", "-o", "addr", "show", "to", str(ip)], capture_output=True, text=True,
                               timeout=5).stdout.split()
        if len(owner) >= 2:  # "2: eth0    inet 10.0.0.1/24 ..."
            return owner[1].split("@")[0]
        # ... else the one the kernel routes it through (127.0.0.5 is lo's without being its address)
        out = subprocess.run(["ip", "-o", "route", "get", str(ip)], capture_output=True, text=True,
                             timeout=5).stdout.split()
        if "dev" in out and out.index("dev") + 1 < len(out):
            return out[out.index("dev") + 1]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return _interface_by_netmask(ip) if ip.version == 4 else ""


def _interface_by_netmask(ip: ipaddress.IPv4Address) -> str:
    """The interface whose primary IPv4 network holds ``ip`` (SIOCGIFADDR / SIOCGIFNETMASK)."""
    import fcntl

    siocgifaddr, siocgifnetmask = 0x8915, 0x891B
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifaddr, req)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifnetmask, req)[20:24])
            except OSError:
                continue  # no IPv4 address
            if ip in ipaddress.ip_network(f"{addr}/{mask}", strict=False):
                return name
    return ""


def interface_counters(iface: str) -> tuple[int | None, int | None]:
    """(tx_bytes, rx_bytes) of ``iface`` since it came up; None where unreadable."""
    def read(name: str) -> int | None:
        if not iface or "/" in iface:
            return None
        try:
            return int((SYS_NET / iface / "statistics" / name).read_text())
        except (OSError, ValueError):
            return None

    return read("tx_bytes"), read("rx_bytes")
