"""The keeper of one emulation run: removes everything the run made the moment its owner dies.

Why not PR_SET_PDEATHSIG alone: the kernel sends it when the creating *thread* exits, not the
process, so a process started from a worker thread (a trace replay, a backend started off the
main thread) would die with that thread while the run goes on; and a node server that stops
gracefully on SIGTERM can take seconds in the middle of an inference.

The keeper is a small process in its own session (a terminal's Ctrl-C to the owner's process
group does not reach it), started before the run builds anything. Its stdin is a pipe whose only
writer is the owner (the write end is close-on-exec, so no other child holds it). End of file
comes when the owner closes it (normal teardown, announced by ``done``: nothing to do) or when
the owner dies, however (SIGKILL included: the kernel closes a dead process's files at once).
Then the keeper kills every process of the run with SIGKILL (the owner is gone, nothing needs a
graceful stop) and removes its links, cgroups, registry file and root-namespace iptables chain
(testbed.net.cleanup.clean, which also puts net.bridge.bridge-nf-call-iptables back if it was the
last run),
and says so in one line on stderr (the owner's).

If the keeper dies with its owner (both killed), the next Emulation's start removes what is
left (testbed.net.cleanup: every run whose owner is gone).

``python -m testbed.net.keeper RUN_ID``: what Keeper.start runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testbed.net import cleanup

DONE = b"done\n"  # the owner cleaned up itself


class Keeper:
    """The owner's handle: ``Keeper.start(run_id)`` at the run's start, ``release()`` after its teardown."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @classmethod
    def start(cls, run_id: str) -> "Keeper":
        proc = subprocess.Popen([sys.executable, "-m", "testbed.net.keeper", run_id], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, start_new_session=True,
                                cwd=str(Path(__file__).resolve().parents[2]))
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self, timeout_s: float = 5.0) -> None:
        """The run is torn down: tell the keeper, and wait for it to exit."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(DONE)
            self.proc.stdin.close()
        except OSError:  # the keeper is gone already
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str]) -> int:
    run_id = argv[0]
    if sys.stdin.buffer.read() == DONE:  # blocks until the owner closes the pipe or dies
        return 0
    removed = cleanup.clean(run_id, grace_s=0.0)
    if not removed.empty():
        print(f"testbed.net: the owner of emulation run {run_id} died; removed {removed.describe()}",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
