"""The host probe's block on demand, timed in CPU seconds, for measuring what a CPU quota costs.

``python -m testbed.bench.probe_worker`` builds the block of testbed.models.probe (1 torch
thread), runs it once and prints ``ready``; then every line N read from stdin runs the block N
times and prints the CPU seconds of this thread and the wall seconds they took. Started inside a
throttled cgroup, the CPU seconds over those of the same worker on a free core are the CPU
overhead of being throttled (caches refilled after every throttle).
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    import torch

    from testbed.models.probe import probe_block

    torch.set_num_threads(1)
    with torch.inference_mode():
        block = probe_block()
        block()
        print("ready", flush=True)
        for line in sys.stdin:
            c, w = time.thread_time(), time.perf_counter()
            for _ in range(int(line)):
                block()
            print(time.thread_time() - c, time.perf_counter() - w, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
