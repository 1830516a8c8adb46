"""``backend: sim``: the same sweep, rows from the SimPy model (testbed.sim) instead of nodes.

Each (cell, method, repetition) becomes one ``Simulator.run`` call; compute profiles are
measured on this host (or extrapolated) by the simulator and cached in its calibration
directory. Rows carry the same columns as emulated ones; ``agreement`` is NaN (nothing
is computed), ``mechanism`` says whether the compute profile was measured or extrapolated.
Each node's device speed (testbed.experiment.topology.node_devices) becomes its compute slow-down.
"""

from __future__ import annotations

from typing import Callable

from testbed.experiment.progress import Progress
from testbed.experiment.spec import ExperimentSpec
from testbed.experiment.store import COLUMNS, ResultStore


def run_sim_cells(spec: ExperimentSpec, todo: list, store: ResultStore, prog: Progress,
                  base_row: Callable[..., dict]) -> int:
    """Simulate every pending (cell, method, repetitions) unit; return rows written."""
    from testbed.experiment.topology import node_devices
    from testbed.net.topology import load_topology
    from testbed.sim.network import KINDS
    from testbed.sim.simulator import SimConfig, Simulator, speed_from_device

    sim = Simulator(SimConfig(), log=lambda msg: prog.show(msg))
    topo = None if isinstance(spec.topology, str) and spec.topology in KINDS else load_topology(spec.topology)
    speed = [speed_from_device(d.speed) for d in node_devices(spec, topo)]
    written = 0
    for cell, mi, method, reps in todo:
        prog.show(f"sim: {method.display}")
        for rep in reps:
            mine = base_row(cell, mi, method, rep)
            rows = sim.run(model=spec.model.name, method=method.name, params=dict(method.params),
                           tokens=spec.input.tokens, nodes=spec.nodes.count, topology=spec.topology,
                           profile=cell.profile, speed=speed, repetitions=1, threads=spec.nodes.threads,
                           batch=spec.input.batch, experiment=spec.name, cell=mine["cell"], label=mine["label"],
                           first_repetition=rep)
            for row in rows:
                # the runner's own key and labels win; the simulator fills the measured columns
                keep = ("experiment", "cell", "label", "topology", "repetition", "trace", "trace_time_s", "time_dilation")
                store.append({c: row.get(c) for c in COLUMNS if c in row} | {k: mine[k] for k in keep})
                written += 1
                prog.step(1)
    return written
