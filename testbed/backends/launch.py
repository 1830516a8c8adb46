"""Start one node server behind a command prefix and wait until it serves.

The prefix says where and how it runs: ``ip netns exec NS`` (a namespace of
testbed.net.plainnet), a capability wrapper (``capsh --drop=cap_net_admin --``), both, or
nothing. The self-shaping tests and the fidelity benchmark start their nodes only through
``start_node``, so a node flag is added in one place.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from testbed.backends.base import node_not_ready, read_lines, ready_addresses

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_node(listen: str, log: Path, prefix: list[str] | None = None, args: list[str] | None = None,
               shell_wrapper: list[str] | None = None, python: str = sys.executable,
               timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """``python -m testbed.node --listen LISTEN ARGS`` behind ``prefix``; stderr (the node's log)
    appended to ``log``. ``shell_wrapper``: a program that takes a shell command line after its
    own arguments (capsh's ``--drop=... -- -c``); the node command is passed to it as one string.
    Returns the process and the address it printed once serving (raises CommError, with the
    log's tail, if it exits or prints nothing within ``timeout_s``). A node on a non-loopback
    address without ``--tls-dir`` gets ``--insecure``: these are the testbed's own namespaces."""
    from testbed.comm.channels import is_loopback, split_hostport

    args = list(args or [])
    if "--tls-dir" not in args and "--insecure" not in args and not is_loopback(split_hostport(listen, "listen")[0]):
        args.append("--insecure")
    node = [python, "-m", "testbed.node", "--listen", listen] + args
    argv = list(prefix or []) + (list(shell_wrapper) + ["exec " + shlex.join(node)] if shell_wrapper else node)
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, cwd=str(REPO_ROOT))
    lines = read_lines(proc, 1, time.monotonic() + timeout_s)
    addrs = ready_addresses(lines)
    if not addrs:
        if proc.poll() is None:
            proc.kill()
        raise node_not_ready(f"node {listen}", proc, lines, timeout_s, log)
    return proc, addrs[0]
