"""Short compute segments separated by idle time, for measuring what a CPU quota does to them.

``python -m testbed.bench.segment_worker`` prints ``ready``; then every line ``K N IDLE_MS`` read
from stdin runs N segments of K 256x256 matrix products (1 torch thread), each after sleeping
IDLE_MS milliseconds, and prints the mean wall time of a segment in seconds (the mean: back to
back, a quota lets some segments run at host speed and throttles others). A device's quota
slows a segment that starts after a short idle down by the dilation factor; one that starts after
an idle longer than the CFS period gets a fresh period's quota at host speed.
"""

from __future__ import annotations

import statistics
import sys
import time


def main() -> int:
    import torch

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
            for _ in range(int(k)):
                torch.mm(a, b)
            times.append(time.perf_counter() - t)
        print(statistics.fmean(times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
