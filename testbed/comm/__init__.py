"""Communicators: one contract (comm.base), several transports (in-process, gRPC)."""

from testbed.comm.base import Communicator
from testbed.comm.inprocess import InProcessGroup, run_inprocess, run_ranks
from testbed.comm.trace import Collective, Compute, Trace

__all__ = ["Communicator", "InProcessGroup", "run_inprocess", "run_ranks", "Trace", "Compute", "Collective"]
