"""SimPy simulator: replays schedules over a modelled network. Beside node, below backends: stands on
methods (their stated schedules), comm (traces) and net (topologies), never on experiment.

Compute segments come from traces measured on this host (``testbed calibrate``,
calibrate.py), scaled per device; messages cross a topology of shaped links with
wire overhead and a first-order TCP model (network.py), replayed by SimPy
(engine.py) or, for lockstep schedules, by the same model vectorized (lockstep.py).
``Simulator.results`` (simulator.py) gives per-rank results of one cell, which the
``sim`` backend (testbed.backends.sim) turns into the runner's InferenceResult;
validate.py sets predictions beside emulated rows.
"""

from testbed.sim.engine import ENGINES, RankStats, Schedule, SimResult, simulate
from testbed.sim.network import KINDS, Network, SimTopology, TcpModel, WireModel
from testbed.sim.profiles import ComputeProfile, ProfileKey, ProfileStore
from testbed.sim.simulator import SimConfig, Simulator, speed_from_device

__all__ = ["ENGINES", "KINDS", "ComputeProfile", "Network", "ProfileKey", "ProfileStore", "RankStats",
           "Schedule", "SimConfig", "SimResult", "SimTopology", "Simulator", "TcpModel", "WireModel", "simulate",
           "speed_from_device"]
