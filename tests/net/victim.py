"""A run to be killed by test_teardown_root and test_crash_root: builds a star, starts nodes and infers in a loop.

``python victim.py infer``: Mininet backend, 4 nodes, slow links, inference after inference.
``python victim.py crash``: the same, with a bandwidth trace replaying on the links and an iperf3
server waiting on h4, the whole run built from a worker thread (which then exits).
``python victim.py build``: only the emulated network (with its delay lines), then sleeps.
Prints ``run <id> keeper <pid>`` once built and ``busy`` once the work that is to be interrupted runs.
The tests start it with the ``start_victim`` fixture (conftest.py).
"""

import sys
import threading
import time

from testbed.net.profile import LinkProfile


def main(mode: str) -> None:
    if mode == "build":
        from testbed.net.emulation import Emulation
        from testbed.net.topology import load_topology

        em = Emulation(load_topology("star")).start()  # no with-block: atexit and signals must clean up
        print("run", em.run.run_id, "keeper", em.keeper.pid, flush=True)
        print("busy", flush=True)
        time.sleep(600)
        return
    from testbed.backends.mininet import MininetBackend
    from testbed.methods.job import JobSpec
    from testbed.node.orchestrator import Orchestrator

    backend = MininetBackend("star")
    if mode == "crash":
        from testbed.net.fidelity import start_iperf_server
        from testbed.net.replay import BandwidthTrace

        def build() -> None:
            box.append(backend.start(4))
            backend.apply_profile(LinkProfile(bandwidth_mbps=2, delay_ms=40))
            start_iperf_server(backend.emulation, "h4")
            backend.replay(BandwidthTrace.from_points([(0, 2), (0.5, 3)]), LinkProfile(delay_ms=40))

        box: list = []
        worker = threading.Thread(target=build)
        worker.start()
        worker.join()
        addresses = box[0]
    else:
        addresses = backend.start(4)
        backend.apply_profile(LinkProfile(bandwidth_mbps=2, delay_ms=40))
    print("run", backend.emulation.run.run_id, "keeper", backend.emulation.keeper.pid, flush=True)
    orch = Orchestrator(addresses, timeout_s=300)
    orch.load(JobSpec(model="vit-tiny", method="tensor_parallel", world_size=4, tokens=65, threads=1))
    print("busy", flush=True)
    while True:
        orch.infer()


if __name__ == "__main__":
    main(sys.argv[1])
