"""SimPy simulator: replays schedule traces over a modelled network (see DESIGN.md, sim/).

Compute segments come from traces measured on this host (``testbed calibrate``),
scaled per device; messages cross a topology of shaped links with wire overhead
and a first-order TCP model. Results have the experiment runner's row columns.
"""

from testbed.sim.engine import RankStats, Schedule, SimResult, simulate
from testbed.sim.network import KINDS, Network, SimTopology, TcpModel, WireModel

__all__ = ["KINDS", "Network", "RankStats", "Schedule", "SimResult", "SimTopology", "TcpModel", "WireModel",
           "simulate"]
