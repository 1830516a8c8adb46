"""Short compute segments separated by idle time, for measuring what a CPU quota does to them.

``python -m testbed.bench.segment_worker`` prints ``ready``; then every line ``K N IDLE_MS`` read
from stdin runs N segments of K 256x256 matrix products (1 torch thread), each after sleeping
IDLE_MS milliseconds, and prints the mean wall time of a segment in seconds (the mean: back to
back, a quota lets some segments run at host speed and throttles others). A device's quota
slows a segment that starts after a short idle down by the dilation factor; one that starts after
an idle longer than the CFS period gets a fresh period's quota at host speed.

``--pace RATE``: every segment is held to its CPU time / RATE (testbed.comm.trace.CpuPacer, as a
node started with ``--pace-cpu`` holds its compute segments), the time printed includes the hold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from testbed.comm.trace import CpuPacer

    ap = argparse.ArgumentParser(prog="python -m testbed.bench.segment_worker")
    ap.add_argument("--pace", type=float, metavar="RATE", help="hold each segment to its CPU time / RATE")
    args = ap.parse_args(argv)
    pacer = CpuPacer(args.pace) if args.pace else None

    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    for _ in range(50):  # warm the kernels and caches
        torch.mm(a, b)
    print("ready", flush=True)
    for line in sys.stdin:
        k, n, idle_ms = line.split()
        times = []
        for _ in range(int(n)):
            time.sleep(float(idle_ms) / 1e3)
            t = time.perf_counter()
            if pacer:
                pacer.mark()
            for _ in range(int(k)):
                torch.mm(a, b)
            if pacer:
                pacer.pace()
            times.append(time.perf_counter() - t)
        print(statistics.fmean(times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
