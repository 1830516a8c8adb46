"""An experiment's ``devices`` key: the inventory of node servers on real machines (backend devices).

Either a path to an inventory YAML file or the same mapping inline::

    devices:
      nodes:                                   # exactly nodes.count entries, in rank order
        - {name: pi1, address: "192.168.1.20:50051", device: {speed: 1.0}}   # device: optional
        - {name: pi2, address: "pi2.local:50051"}
      tls: certs/                              # optional: a directory made by `testbed certs`
      connect_timeout_s: 10                    # optional

Relative paths (the file, ``tls``) start at the directory of the file that holds them. Every
error names its YAML path (``devices.nodes[1].address``; in an inventory file, the file's
name: ``lab.yaml.nodes[1].address``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from testbed.backends.inventory import DEFAULT_CONNECT_TIMEOUT_S, DeviceNode, Inventory
from testbed.errors import ConfigError, check
from testbed.experiment import fields as F
from testbed.yamlfile import read_yaml

DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_CONNECT_TIMEOUT_S = 3600.0


def parse_devices(v: Any, count: int, base_dir: Path, path: str = "devices") -> Inventory:
    """The inventory of an experiment's ``devices`` value (``count``: nodes.count)."""
    source = None
    if isinstance(v, str):
        check(v != "", path, v, "a path to an inventory YAML file, or an inline mapping with `nodes`")
        file = _resolve(v, base_dir)
        check(file.is_file(), path, v, f"an existing inventory YAML file (relative paths start at {base_dir})")
        source, base_dir = str(file), file.parent
        v, path = read_yaml(file), file.name
    check(isinstance(v, dict), path, v, "a mapping with keys nodes, tls, connect_timeout_s (or a path to a file of it)")
    d = F.mapping(v, path, {"nodes": True, "tls": False, "connect_timeout_s": False})
    np = F.join(path, "nodes")
    items = F.seq(d["nodes"], np, "devices, e.g. {name: pi1, address: \"192.168.1.20:50051\"}")
    check(len(items) == count, np, f"{len(items)} entries", f"exactly nodes.count = {count} entries, in rank order")
    nodes: list[DeviceNode] = []
    for i, item in enumerate(items):
        nodes.append(_node(item, F.join(np, i)))
        for key in ("name", "address"):
            earlier = [j for j, n in enumerate(nodes[:-1]) if getattr(n, key) == getattr(nodes[-1], key)]
            check(not earlier, F.join(F.join(np, i), key), getattr(nodes[-1], key),
                  f"a {key} no other device has (nodes[{earlier[0] if earlier else 0}] has it)")
    tls = None
    if d.get("tls") is not None:
        tp = F.join(path, "tls")
        raw = F.string(d["tls"], tp)
        p = _resolve(raw, base_dir)
        check(p.is_dir(), tp, raw, f"a directory made by `testbed certs DIR` (relative paths start at {base_dir})")
        tls = str(p)
    timeout = F.number(d.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S), F.join(path, "connect_timeout_s"),
                       0, MAX_CONNECT_TIMEOUT_S, lo_open=True)
    return Inventory(tuple(nodes), tls, timeout, source)


def _node(v: Any, path: str) -> DeviceNode:
    from testbed.comm.channels import split_hostport
    from testbed.net.topology import device_profile

    d = F.mapping(v, path, {"name": True, "address": True, "device": False})
    name = F.string(d["name"], F.join(path, "name"))
    check(bool(DEVICE_NAME_RE.match(name)), F.join(path, "name"), name, "letters, digits, '.', '_' and '-' only")
    ap = F.join(path, "address")
    address = F.string(d["address"], ap)
    hint = "HOST:PORT of the node server (`python -m testbed.node --listen 0.0.0.0:PORT`), PORT in 1..65535"
    check(not any(c.isspace() for c in address), ap, address, hint)
    try:
        host, port = split_hostport(address, ap)
    except ConfigError:
        raise ConfigError(ap, address, hint) from None
    check(1 <= port <= 65535 and host not in ("", "0.0.0.0", "::"), ap, address, hint + ", a host others can reach")
    device = device_profile(d["device"], F.join(path, "device")) if d.get("device") is not None else None
    return DeviceNode(name, address, device)


def _resolve(p: str, base_dir: Path) -> Path:
    q = Path(p).expanduser()
    return (q if q.is_absolute() else Path(base_dir) / q).resolve()
