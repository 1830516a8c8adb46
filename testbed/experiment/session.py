"""The nodes of a run: one backend and the client that drives its nodes, started once.

``NodeSession`` starts the backend lazily (first profile or job), keeps the link
profile applied, and is rebuilt from scratch after a failure that may have taken
nodes down (the gRPC orchestrator stops every node when one fails), so that one
failed cell does not fail the rest of the sweep. ``close()`` tears everything
down and is safe to call twice, from a signal path too.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Callable

from testbed.backends.base import Backend
from testbed.errors import ConfigError
from testbed.experiment.spec import ExperimentSpec, TraceSpec
from testbed.methods.job import JobSpec
from testbed.net.profile import LinkProfile


def make_backend(spec: ExperimentSpec, log_dir: Path | None = None, time_dilation: float = 1.0,
                 topology=None) -> Backend:
    """The backend the spec names, built but not started. Node logs go to ``log_dir`` when given;
    ``time_dilation`` and ``topology`` (already loaded) are for mininet."""
    if spec.backend == "inprocess":
        from testbed.experiment.inprocess import InProcessBackend

        return InProcessBackend()
    if spec.backend == "loopback":
        from testbed.backends.loopback import LoopbackBackend

        return LoopbackBackend(log_dir=str(log_dir) if log_dir else None)
    if spec.backend == "mininet":
        from testbed.experiment.topology import mininet_backend

        return mininet_backend(spec, log_dir, time_dilation, topology)
    raise ConfigError("backend", spec.backend, "inprocess | loopback | mininet (sim cells do not start nodes)")


class NodeSession:
    def __init__(self, spec: ExperimentSpec, on_start: Callable[[Backend], None] | None = None,
                 log_dir: Path | None = None, time_dilation: float = 1.0, topology=None):
        self.spec, self.on_start, self.log_dir = spec, on_start, log_dir
        self.time_dilation, self.topology = time_dilation, topology
        self.backend: Backend | None = None
        self.client: Any = None
        self.profile: LinkProfile | None = None
        self.job: JobSpec | None = None
        self.starts = 0

    def _ensure(self) -> None:
        if self.backend is not None:
            return
        backend = make_backend(self.spec, self.log_dir, self.time_dilation, self.topology)
        self.backend = backend  # set first: close() must reach a half-started backend
        addresses = backend.start(self.spec.nodes.count)
        if hasattr(backend, "client"):
            self.client = backend.client(addresses, self.spec.timeout_s)
        else:
            from testbed.node.orchestrator import Orchestrator

            # building a large model on N nodes sharing few cores can take minutes
            self.client = Orchestrator(addresses, timeout_s=self.spec.timeout_s,
                                       load_timeout_s=max(300.0, self.spec.timeout_s))
        self.starts += 1
        if self.on_start is not None:
            self.on_start(backend)
        if self.profile is not None:
            backend.apply_profile(self.profile)

    def apply(self, profile: LinkProfile) -> None:
        self._ensure()
        self.backend.apply_profile(profile)
        self.profile = profile

    def start_trace(self, trace: TraceSpec) -> None:
        """Replay a bandwidth trace on every shaped link from now until stop_trace()."""
        from testbed.experiment.topology import start_trace

        self._ensure()
        start_trace(self.backend, trace)

    def stop_trace(self) -> None:
        if self.backend is not None:
            from testbed.experiment.topology import stop_trace

            stop_trace(self.backend)

    def load(self, job: JobSpec) -> None:
        self._ensure()
        self.client.load(job)
        self.job = job

    def infer(self):
        return self.client.infer()

    def wire_bytes(self) -> int | None:
        return self.backend.wire_bytes() if self.backend is not None else None

    @property
    def mechanism(self) -> str:
        return getattr(self.backend, "mechanism", "none") if self.backend is not None else "?"

    def reset(self) -> None:
        """Tear down after a failure; the next call starts fresh nodes with the same profile."""
        self.close()

    def close(self) -> None:
        client, backend = self.client, self.backend
        self.client, self.backend, self.job = None, None, None
        if client is None and backend is None:
            return
        # a second Ctrl-C / SIGTERM must not cut the teardown short: hold signals until it is done
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        main = threading.current_thread() is threading.main_thread()
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            if client is not None:
                client.shutdown()
        finally:
            try:
                if backend is not None:
                    backend.close()
            finally:
                if main:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
