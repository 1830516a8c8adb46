"""A fixed forward pass on demand, for measuring what a CPU quota does to compute.

``python -m testbed.bench.forward_worker MODEL TOKENS`` builds MODEL (1 torch thread), runs one
warm-up forward at TOKENS tokens and prints ``ready``; then every line N read from stdin runs N
forward passes and prints their wall time and the CPU seconds of this thread. Started inside a
device's cgroup, it shows how much slower that device computes than this host's free cores.
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    import torch

    from testbed.models import build_model

    torch.set_num_threads(1)
    model = build_model(argv[0], seed=0)
    x = model.make_input(int(argv[1]), batch=1, seed=0)
    with torch.inference_mode():
        model(x)
        print("ready", flush=True)
        for line in sys.stdin:
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(int(line)):
                model(x)
            print(time.perf_counter() - t, time.thread_time() - c, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
