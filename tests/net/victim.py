"""A run to be killed by test_teardown_root: builds a star, starts nodes and infers in a loop.

``python victim.py infer``: Mininet backend, 4 nodes, slow links, inference after inference.
``python victim.py build``: only the emulated network (with its delay lines), then sleeps.
Prints ``run <id>`` once built and ``busy`` once the work that is to be interrupted runs.
"""

import sys
import time

from testbed.net.profile import LinkProfile


def main(mode: str) -> None:
    if mode == "build":
        from testbed.net.emulation import Emulation
        from testbed.net.topology import load_topology

        em = Emulation(load_topology("star")).start()  # no with-block: atexit and signals must clean up
        print("run", em.run.run_id, flush=True)
        print("busy", flush=True)
        time.sleep(600)
        return
    from testbed.backends.mininet import MininetBackend
    from testbed.methods.job import JobSpec
    from testbed.node.orchestrator import Orchestrator

    backend = MininetBackend("star")
    addresses = backend.start(4)
    print("run", backend.emulation.run.run_id, flush=True)
    backend.apply_profile(LinkProfile(bandwidth_mbps=2, delay_ms=40))
    orch = Orchestrator(addresses, timeout_s=300)
    orch.load(JobSpec(model="vit-tiny", method="tensor_parallel", world_size=4, tokens=65, threads=1))
    print("busy", flush=True)
    while True:
        orch.infer()


if __name__ == "__main__":
    main(sys.argv[1])
