"""The backend of a run, started once and restarted after a failure.

``backend_setup`` turns an experiment and what its checks prepared (the topology, loaded
once; the dilation factor) into the BackendSetup every backend is built from.
``BackendSession`` builds the spec's backend from the registry and starts it lazily (first
profile or job), keeps the link profile applied, and is rebuilt from scratch after a
failure that may have taken nodes down (the gRPC orchestrator stops every node when one
fails), so that one failed cell does not fail the rest of the sweep. ``close()`` tears
everything down and is safe to call twice, from a signal path too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from testbed.backends import backend_class
from testbed.backends.base import Backend, BackendSetup
from testbed.comm.inprocess import signals_held
from testbed.errors import ConfigError
from testbed.experiment.spec import ExperimentSpec, TraceSpec
from testbed.methods.job import JobSpec
from testbed.net.profile import LinkProfile
from testbed.node.records import InferenceResult


def backend_setup(spec: ExperimentSpec, topology, time_dilation: float = 1.0, log_dir: Path | None = None,
                  run_dir: Path | None = None, settings: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None, machine: Any = None) -> BackendSetup:
    """What the spec's backend is built from; ``topology``: the spec's, already loaded (checks.Prepared)."""
    from testbed.experiment.topology import experiment_topology, node_devices

    topo = experiment_topology(spec, topology)
    return BackendSetup(nodes=spec.nodes.count, timeout_s=spec.timeout_s, log_dir=log_dir, run_dir=run_dir,
                        topology=topo, topology_source=spec.topology, devices=node_devices(spec, topo),
                        seed=spec.input.seed, time_dilation=time_dilation,
                        cpu_slice_ms=spec.emulation.cpu_slice_ms, pace_compute=spec.emulation.pace_compute,
                        network_core=spec.emulation.network_core,
                        settings=dict(settings or {}),
                        log=log or (lambda _msg: None), machine=machine, inventory=spec.devices)


class BackendSession:
    def __init__(self, spec: ExperimentSpec, setup: BackendSetup, on_start: Callable[[Backend], None] | None = None,
                 startup=None):
        self.spec, self.setup, self.on_start = spec, setup, on_start
        self.startup = startup  # testbed.experiment.startup.Startup: times the first start
        self.backend: Backend | None = None
        self.profile: LinkProfile | None = None
        self.job: JobSpec | None = None
        self.starts = 0

    def _ensure(self) -> Backend:
        if self.backend is not None:
            return self.backend
        backend = backend_class(self.spec.backend).from_setup(self.setup)
        self.backend = backend  # set first: close() must reach a half-started backend
        if self.startup is not None:
            with self.startup.phase("backend start"):  # network build and node servers
                backend.start(self.spec.nodes.count)
        else:
            backend.start(self.spec.nodes.count)
        self.starts += 1
        if self.on_start is not None:
            self.on_start(backend)
        if self.profile is not None:
            backend.apply_profile(self.profile)
        return backend

    def apply(self, profile: LinkProfile) -> None:
        self._ensure().apply_profile(profile)
        self.profile = profile

    def start_trace(self, trace: TraceSpec) -> None:
        """Replay a bandwidth trace on every shaped link from now until stop_trace(), with the
        trace's delay, jitter and loss."""
        from testbed.experiment.topology import bandwidth_trace

        base = LinkProfile(None, trace.delay_ms, trace.jitter_ms, trace.loss_pct)
        self._ensure().replay(bandwidth_trace(trace), base, loop=trace.loop)

    def stop_trace(self) -> None:
        if self.backend is not None:
            self.backend.stop_replays()

    def prepare(self, jobs: list[JobSpec]) -> None:
        """Tell the backend (started if it is not) every job the run will load (Backend.prepare)."""
        self._ensure().prepare(jobs)

    def load(self, job: JobSpec) -> None:
        self._ensure().load(job)
        self.job = job

    def infer(self, repetition: int | None = None) -> InferenceResult:
        if self.backend is None:
            raise ConfigError("job", None, "a job loaded before infer() (the backend was closed)")
        return self.backend.infer(repetition)

    def wire_bytes(self) -> int | None:
        return self.backend.wire_bytes() if self.backend is not None else None

    def retransmitted_segments(self) -> int | None:
        return self.backend.retransmitted_segments() if self.backend is not None else None

    def device_probe_s(self) -> list[float] | None:
        return self.backend.device_probe_s() if self.backend is not None else None

    @property
    def mechanism(self) -> str:
        return self.backend.mechanism if self.backend is not None else "?"

    def reset(self) -> None:
        """Tear down after a failure; the next call starts a fresh backend with the same profile."""
        self.close()

    def close(self) -> None:
        backend, self.backend, self.job = self.backend, None, None
        if backend is None:
            return
        with signals_held():  # a second Ctrl-C / SIGTERM must not cut the teardown short
            backend.close()
