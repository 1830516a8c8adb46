"""Network-emulation testbed for multi-device Transformer inference (ASTRA and baselines)."""

import os

# grpcio is built with fork support on: its atfork handlers run in every child forked from a
# process whose gRPC threads are alive, and aborted delay-line and tc children the emulation
# forks from the runner (or the test process) with "epoll_wait: Bad file descriptor". Every
# child of ours execs at once, so the handlers buy nothing. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

__version__ = "0.1.0"
