"""Communicators: one contract (comm.base, with each collective's message plan), two transports
(in-process threads, gRPC peer streams with their frames and channel options).

Stands on errors and proto only; methods call collectives through it, node serves its streams.
"""

from testbed.comm.base import Communicator
from testbed.comm.inprocess import InProcessGroup, run_inprocess, run_ranks
from testbed.comm.trace import Collective, Compute, Trace

__all__ = ["Communicator", "InProcessGroup", "run_inprocess", "run_ranks", "Trace", "Compute", "Collective"]
