"""SimPy simulator: replays schedule traces over a modelled network (the ``sim`` layer: beside node, below backends).

Compute segments come from traces measured on this host (``testbed calibrate``,
calibrate.py), scaled per device; messages cross a topology of shaped links with
wire overhead and a first-order TCP model (network.py), replayed by SimPy
(engine.py) or, for lockstep schedules, by the same model vectorized (lockstep.py).
``Simulator.run`` (simulator.py) gives rows with the experiment runner's columns;
validate.py sets them beside emulated rows.
"""

from testbed.sim.engine import ENGINES, RankStats, Schedule, SimResult, simulate
from testbed.sim.network import KINDS, Network, SimTopology, TcpModel, WireModel
from testbed.sim.profiles import ComputeProfile, ProfileKey, ProfileStore
from testbed.sim.simulator import ROW_COLUMNS, SimConfig, Simulator, simulate_cell, speed_from_device

__all__ = ["ENGINES", "KINDS", "ComputeProfile", "Network", "ProfileKey", "ProfileStore", "ROW_COLUMNS", "RankStats",
           "Schedule", "SimConfig", "SimResult", "SimTopology", "Simulator", "TcpModel", "WireModel", "simulate",
           "simulate_cell", "speed_from_device"]
