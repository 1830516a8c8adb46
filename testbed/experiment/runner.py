"""The experiment runner: sweep link profiles live over nodes started once, one row per repetition.

Order of work (what ``testbed run`` does), the same for every backend (testbed.backends):
1. compute the single-device reference output once, in this process (for backends that
   compute outputs; the simulator does not);
2. calibrate astra codebooks once per (groups, codebook_size) and save them in the
   run directory (nodes load them by path), unless the model brings trained ones (also
   only for backends that compute outputs);
3. start the backend once and tell it every job the run will load (``Backend.prepare``: the
   simulator measures the compute profiles it lacks together); for each cell apply its link profile live, for
   each method load the job, run ``warmup`` unmeasured inferences, then
   ``repetitions`` measured ones, appending one row (and its per-rank traces) per
   repetition as soon as it is measured. In a trace cell the bandwidth trace
   restarts from its beginning when each method's repetitions start (after its
   warm-up, which runs at the trace's first bandwidth), so every method sees the
   same bandwidth timeline; ``trace_time_s`` is the time since that start and
   ``bandwidth_mbps`` the bandwidth the trace scheduled for that moment. Scheduled faults
   (testbed.experiment.faults) start from the same moment in every unit; each row names those
   that hit it (``faults``) and the manifest lists every event with the time it fired;
4. write Parquet, finish the manifest, make the plots.

Under time dilation (testbed.experiment.dilation) the backend runs F times slower than real
time and hands back results in device time; the runner only says so (one line at the start,
the manifest, the ``time_dilation`` column) and measures ``trace_time_s`` in device time.

A failure inside a cell (load, warm-up or a repetition) is recorded as rows with
status "error" and the message; the nodes are restarted and the sweep goes on. So is a
failure to restart them (or to apply a cell's profile) once they started the first time:
that cell's units are recorded failed and the next cell tries again.
SIGTERM and Ctrl-C stop the run between two Python statements: the backend is
torn down, what was measured stays, and ``--resume DIR`` measures only the
(cell, repetition) pairs that have no row yet; with ``retry_failed`` also those whose
row is an error (the error row stays in rows.csv, superseded by the new one:
testbed.experiment.store).
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from testbed.backends import backend_class
from testbed.backends.base import Backend
from testbed.experiment.checks import Prepared, check_spec
from testbed.experiment.dilation import busy_cores, busy_warning
from testbed.experiment.faults import FaultTimeline
from testbed.experiment.manifest import Manifest, now_iso
from testbed.experiment.metrics import (Reference, decode_columns, make_reference, memory_columns, output_columns,
                                       timing_columns)
from testbed.experiment.progress import Progress
from testbed.experiment.session import BackendSession, backend_setup
from testbed.experiment.shard import Shard, cell_id, select_units, spec_digest, sweep_units
from testbed.experiment.spec import Cell, ExperimentSpec, MethodSpec
from testbed.experiment.startup import Startup
from testbed.experiment.store import ResultStore, read_rows
from testbed.methods.job import JobSpec
from testbed.models.probe import host_probe_s
from testbed.net.profile import LinkProfile


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: stop the sweep, keep what was measured (not an Exception: no cell catches it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass
class RunOutcome:
    out_dir: Path
    status: str  # complete | interrupted | failed
    rows: int = 0
    failed_rows: int = 0
    measured_now: int = 0
    plots: list[str] = field(default_factory=list)
    signum: int | None = None


class Runner:
    def __init__(self, spec: ExperimentSpec, out_dir: Path, *, prepared: Prepared | None = None, resume: bool = False,
                 source: str | None = None, progress: bool = True, plots: bool = True,
                 backend_settings: dict | None = None, retry_failed: bool = False, shard: Shard | None = None):
        """``prepared``: what check_spec built (model, codebooks, topology); made here if None (the spec is
        checked again). ``backend_settings``: the backend's own options (BackendSetup.settings).
        ``retry_failed``: on resume, measure again the units whose latest row is an error.
        ``shard``: measure only that shard's units (testbed.experiment.shard; None: every unit)."""
        self.spec, self.out_dir, self.resume = spec, Path(out_dir), resume
        self.retry_failed = retry_failed
        self.backend_settings = dict(backend_settings or {})
        self.prepared = prepared if prepared is not None else check_spec(
            spec, codebook_dir=Path(out_dir) / "codebooks")
        self.source, self.show_progress, self.make_plots = source, progress, plots
        self.shard = shard
        self.plan = select_units(sweep_units(spec), shard)  # the (cell, method index, method) units to measure
        self.dilation = self.prepared.dilation  # testbed.experiment.dilation.Dilation, resolved by check_spec
        self.startup = self.prepared.startup or Startup()  # the clock to the first measured inference
        self.mechanism = "?"  # the backend's shaping mechanism, known once it started
        self.trace_t0: float | None = None  # when the current unit's bandwidth trace started (monotonic s)
        self.trace_bw = None  # the current trace cell's testbed.net.replay.BandwidthTrace

    # ------------------------------------------------------------------ top level
    def run(self) -> RunOutcome:
        outcome = RunOutcome(self.out_dir, "failed")
        SIGNALLED.clear()  # what earlier runs of this process received is theirs
        RAISED.clear()
        with quiet_dropped_interrupts():
            return self._run(outcome)

    def _run(self, outcome: RunOutcome) -> RunOutcome:
        old = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
        store = ResultStore(self.out_dir)
        manifest = Manifest(self.out_dir, self.spec.to_dict(), self.source, self.resume)
        done: set = set()
        busy = busy_cores() if self.dilation.mode != "off" else None  # other work, before our nodes start
        manifest.set(time_dilation={**self.dilation.to_dict(),
                                    **({} if busy is None else {"host_busy_cores_at_start": busy})},
                     experiment_digest=spec_digest(self.spec.to_dict()),
                     shard=None if self.shard is None else {**self.shard.to_dict(),
                                                            "units": [cell_id(c, mi) for c, mi, _ in self.plan]})
        self._say(self.dilation.explain())
        for warning in (self.dilation.warning(), busy_warning(busy, self.dilation)):
            if warning:
                print(f"testbed run: {warning}", file=sys.stderr, flush=True)
        try:
            done = store.done() - (store.failed() if self.retry_failed else set())
            total = len(self.plan) * self.spec.repetitions
            prog = Progress(total, done=len(done), enabled=self.show_progress)
            self._sweep(store, manifest, done, prog)
            outcome.status = "complete"
        except Interrupted as e:
            outcome.status, outcome.signum = "interrupted", e.signum
        except SystemExit as e:  # a signal handler of a lower layer (the emulation's own guard) got there first
            if e.code not in {128 + s for s in STOP_SIGNALS}:
                raise
            outcome.status, outcome.signum = "interrupted", int(e.code) - 128
        except Exception as e:  # e.g. the backend could not start: no cell can run; say why in the manifest
            manifest.data["error"] = _msg(e)
            raise
        finally:
            for s, h in old.items():  # from here on a second signal kills at once: nothing long is left
                signal.signal(s, h)
            store.close()
            self._finish(store, manifest, outcome)
            outcome.measured_now = outcome.rows - len(done)
        return outcome

    def _say(self, msg: str) -> None:
        if self.show_progress:
            print(f"testbed run: {msg}", file=sys.stderr, flush=True)

    def _finish(self, store: ResultStore, manifest: Manifest, outcome: RunOutcome) -> None:
        df = read_rows(self.out_dir)
        outcome.rows, outcome.failed_rows = len(df), int((df["status"] != "ok").sum()) if len(df) else 0
        if len(df):
            store.write_parquet()
        if self.make_plots and len(df):
            self._say("drawing plots")
            from testbed.experiment.plots import save_all
            from testbed.experiment.topology import trace_schedules

            outcome.plots = [str(p) for p in save_all(df, self.out_dir / "plots", trace_schedules(self.spec))]
        manifest.finish(outcome.status, outcome.rows, outcome.failed_rows, outcome.plots,
                        superseded=int(read_rows(self.out_dir, superseded=True)["superseded"].sum()))
        if len(df):
            from testbed.experiment.htmlreport import write_html

            write_html(self.out_dir)

    def _sweep(self, store: ResultStore, manifest: Manifest, done: set, prog: Progress) -> int:
        todo = [(c, mi, m, [r for r in range(self.spec.repetitions) if (cell_id(c, mi), r) not in done])
                for c, mi, m in self.plan]
        todo = [t for t in todo if t[3]]
        if not todo:
            return 0
        s = self.spec
        ref, codebooks = None, {}
        if backend_class(s.backend).computes:  # outputs to compare, codebooks to load
            prog.show("computing the single-device reference")
            ref = make_reference(self.prepared.model, s.input.tokens, s.input.batch, s.input.seed, s.model.dataset,
                                 s.input.generate)
            prog.show("astra codebooks")
            codebooks = self.prepared.codebooks.write(self.out_dir / "codebooks", only=sorted({t[1] for t in todo}))
            manifest.set(codebooks={s.methods[i].display: p for i, p in codebooks.items()},
                         codebooks_made=self.prepared.codebooks.describe())  # "cached", "fit in S s", ...
        measured = 0
        setup = backend_setup(s, self.prepared.topology, self.dilation.factor, log_dir=self.out_dir / "node-logs",
                              run_dir=self.out_dir, settings=self.backend_settings, log=prog.show,
                              machine=self.prepared.machine)
        session = BackendSession(s, setup, on_start=lambda b: self._on_backend(manifest, b), startup=self.startup)
        try:
            session.prepare([self.job(m, c, codebooks.get(mi)) for c, mi, m, _ in todo])
            for cell in self.spec.cells():
                units = [t for t in todo if t[0].index == cell.index]
                if not units:
                    continue
                prog.show(f"cell {cell.index}: {describe_cell(cell)}")
                try:
                    self._enter_cell(session, cell, manifest)
                except Exception as e:  # noqa: BLE001
                    if session.starts == 0:  # the backend never started: no cell can run
                        raise
                    # a restart after a failure (a device still gone) or the profile failed: this cell's
                    # units are its result, the next cell tries again
                    for _, mi, method, reps in units:
                        measured += self._fail(session, store, prog, cell, mi, method, reps, f"cell start: {_msg(e)}")
                    continue
                try:
                    for _, mi, method, reps in units:
                        path = codebooks.get(mi)
                        measured += self._unit(session, store, manifest, prog, ref, cell, mi, method, reps, path)
                finally:
                    if cell.trace is not None:
                        session.stop_trace()
        finally:
            session.close()
            prog.close()
        return measured

    def _enter_cell(self, session: BackendSession, cell: Cell, manifest: Manifest) -> None:
        session.apply(cell.profile)
        self.trace_t0, self.trace_bw = None, None
        backend = session.backend
        if backend.measures_fidelity and self.spec.fidelity_s > 0 and cell.trace is None:
            try:  # what the links really do in this cell, next to what was configured
                table = backend.fidelity_table(seconds=self.spec.fidelity_s)
            except Exception as e:  # noqa: BLE001 - a failed check is recorded, the sweep goes on
                table = {"error": _msg(e)}
            manifest.data.setdefault("fidelity", []).append(
                {"cell": cell.index, "profile": describe_cell(cell), "measured_at": now_iso(), "paths": table})
            manifest.write()

    # ------------------------------------------------------------------ one method in one cell
    def _unit(self, session: BackendSession, store: ResultStore, manifest: Manifest, prog: Progress,
              ref: Reference | None, cell: Cell, mi: int, method: MethodSpec, reps: list[int],
              codebook_path: str | None) -> int:
        """Load, warm up and measure the pending repetitions of one method in one cell; return rows written."""
        stop_if_signalled()
        prog.show(f"{describe_cell(cell)} | {method.display}")
        job, phase, faults = self.job(method, cell, codebook_path), "load", None
        try:
            if cell.trace is not None:
                self._hold_trace_start(session, cell)
            with self.startup.phase("job load and warm-up"):
                session.load(job)
                self._record_load_memory(manifest, cell, method, session.backend.load_times)
                self.mechanism = session.mechanism  # a model-based backend says per job where its times come from
                phase = "warm-up"
                for _ in range(self.spec.warmup):
                    session.infer()
            # how fast this host is now (the nodes idle): carries a calibration over to this unit's rows;
            # then the same block inside every node at once: what their quotas' throttling costs now
            probe = host_probe_s() if session.backend.computes_here else None
            phase = "probe"
            devices = session.device_probe_s() if session.backend.computes_here else None
            device_probe = statistics.median(devices) if devices else None
            if cell.trace is not None:
                phase = "trace start"
                session.start_trace(cell.trace)
                self.trace_t0 = time.monotonic()
            if self.spec.faults:
                faults = FaultTimeline(self.spec.faults, session.backend, self.dilation.factor,
                                       self.prepared.topology.host_names).start()
        except Exception as e:  # noqa: BLE001 - any failure is this cell's result, recorded below
            return self._fail(session, store, prog, cell, mi, method, reps, f"{phase}: {_msg(e)}")
        stop_if_signalled()  # a signal during the node start or load whose raise Python dropped
        try:
            for k, rep in enumerate(reps):
                stop_if_signalled()
                row = self.base_row(cell, mi, method, rep)
                row["host_probe_s"], row["device_probe_s"] = probe, device_probe
                t0, wire0, re0 = faults.now() if faults else None, session.wire_bytes(), session.retransmitted_segments()
                try:
                    res = session.infer(rep)
                except Exception as e:  # noqa: BLE001
                    hit = _fault_columns(faults, t0)
                    if faults is not None:  # stopped before the nodes are: fresh ones come next
                        self._end_faults(faults, manifest, cell, method, restore=False)
                        faults = None
                    msg = f"repetition {rep}: {_msg(e)}"
                    return k + self._fail(session, store, prog, cell, mi, method, reps[k:], msg, hit)
                row.update(_fault_columns(faults, t0))
                wire1 = session.wire_bytes()
                row.update(timing_columns(res.latency_s, res.nodes), **output_columns(res.output, ref),
                           **decode_columns(res.nodes, ref), **memory_columns(res.nodes))
                row["bytes_on_wire"] = wire1 - wire0 if wire0 is not None and wire1 is not None else None
                re1 = session.retransmitted_segments()
                row["retransmitted_segments"] = re1 - re0 if re0 is not None and re1 is not None else None
                row["status"], row["error"] = "ok", ""
                store.append(row, [n.trace.to_dict() for n in res.nodes] if session.backend.keeps_traces else None)
                if self.startup.first_inference():
                    manifest.set(startup=self.startup.to_dict())
                prog.step(1)
        finally:
            if faults is not None:
                self._end_faults(faults, manifest, cell, method, restore=True)
        return len(reps)

    @staticmethod
    def _record_load_memory(manifest: Manifest, cell: Cell, method: MethodSpec, load_times: list) -> None:
        """What each node process held once the job was built (none for the simulator)."""
        if not load_times:
            return
        nodes = [{"rss_mib": round(t.rss_kib / 1024, 1),
                  "pss_mib": None if t.pss_kib is None else round(t.pss_kib / 1024, 1)} for t in load_times]
        manifest.data.setdefault("memory", []).append(
            {"cell": cell.index, "method": method.display, "after": "load", "nodes": nodes})
        manifest.write()

    def _end_faults(self, faults: FaultTimeline, manifest: Manifest, cell: Cell, method: MethodSpec,
                    restore: bool) -> None:
        """Stop the unit's faults (``restore``: links back as the cell has them) and list what fired."""
        events = faults.stop(restore)
        manifest.data.setdefault("faults", []).append(
            {"cell": cell.index, "method": method.display, "profile": describe_cell(cell), "events": events})
        manifest.write()

    def _hold_trace_start(self, session: BackendSession, cell: Cell) -> None:
        """Stop the previous method's replay and hold the links at the trace's first bandwidth."""
        from testbed.experiment.topology import bandwidth_trace

        session.stop_trace()
        self.trace_bw, self.trace_t0 = bandwidth_trace(cell.trace), None
        p = cell.profile
        session.apply(LinkProfile(self.trace_bw.points[0][1], p.delay_ms, p.jitter_ms, p.loss_pct))

    def _fail(self, session, store, prog, cell, mi, method, reps, msg: str, faults: dict | None = None) -> int:
        """Error rows for ``reps``; ``faults``: the fault columns of the first (the repetition that failed)."""
        if session.backend is not None:
            self.mechanism = session.mechanism
        session.reset()  # nodes may be gone or out of step: the next unit starts fresh ones
        for rep in reps:
            row = self.base_row(cell, mi, method, rep)
            row.update(status="error", error=msg if rep == reps[0] else f"skipped after: {msg}")
            if rep == reps[0]:
                row.update(faults or {})
            store.append(row)
            prog.step(1)
        return len(reps)

    def settled_params(self, method: MethodSpec, cell: Cell) -> dict:
        """The method's params with the run's choices made for this cell (e.g. tensor_parallel's
        all-reduce by topology and delay)."""
        from testbed.methods import method_class
        from testbed.models import CONFIGS

        s, topo = self.spec, self.prepared.topology
        flat = topo is None or topo.is_flat(s.nodes.count)  # no topology: every rank on this host
        delay = cell.profile.delay_ms if backend_class(s.backend).shapes_links else None
        cfg = CONFIGS[s.model.name]  # the sim backend's checks build no model: the config is enough
        return method_class(method.name).settle(dict(method.params), cfg, s.input.tokens, s.nodes.count,
                                                s.input.batch, flat, delay)

    def job(self, method: MethodSpec, cell: Cell, codebook_path: str | None) -> JobSpec:
        s = self.spec
        return JobSpec(model=s.model.name, method=method.name, world_size=s.nodes.count, tokens=s.input.tokens,
                       params=self.settled_params(method, cell), seed=s.input.seed, batch=s.input.batch,
                       weights_path=s.model.weights_path, codebook_path=codebook_path, threads=s.nodes.threads,
                       dataset=s.model.dataset, generate=s.input.generate)

    def base_row(self, cell: Cell, mi: int, method: MethodSpec, rep: int) -> dict:
        s, p = self.spec, cell.profile
        bw, t = p.bandwidth_mbps, None
        if cell.trace is not None and self.trace_t0 is not None:
            t = (time.monotonic() - self.trace_t0) / self.dilation.factor  # device time
            bw = self.trace_bw.bandwidth_at(t, loop=cell.trace.loop)
        return {
            "experiment": s.name, "backend": s.backend, "mechanism": self.mechanism,
            "time_dilation": self.dilation.factor, "cell": cell_id(cell, mi),
            "method": method.name, "method_params": method.params_json, "label": method.display,
            "all_reduce": self.settled_params(method, cell).get("all_reduce", ""),  # the algorithm that ran, if any
            "model": s.model.name, "tokens": s.input.tokens, "generate": s.input.generate, "batch": s.input.batch,
            "nodes": s.nodes.count,
            "topology": s.topology_name,
            "bandwidth_mbps": bw,
            "delay_ms": p.delay_ms, "jitter_ms": p.jitter_ms, "loss_pct": p.loss_pct,
            "trace": cell.trace.name if cell.trace is not None else "",
            "trace_time_s": t,
            "repetition": rep, "started_at": now_iso(),
        }

    def _on_backend(self, manifest: Manifest, backend: Backend) -> None:
        self.mechanism = backend.mechanism
        ids = manifest.data["backend"].get("emulation_runs", []) + backend.run_ids()  # what `testbed clean` knows
        starts = manifest.data["backend"].get("starts", 0) + 1  # > 1: nodes were restarted after a failure
        machines = backend.machines()  # the nodes' own machines (real devices), as they were at this start
        manifest.backend(backend.name, self.mechanism,
                         "per cell, under `fidelity`" if backend.measures_fidelity else None,
                         {"starts": starts, **({"emulation_runs": ids} if ids else {}), **backend.shaping_details(),
                          **({"nodes": machines} if machines else {})})
        for s in STOP_SIGNALS:  # a backend may install its own handlers; ours stop the sweep between rows
            signal.signal(s, _raise_interrupted)


def _fault_columns(faults: FaultTimeline | None, t0: float | None) -> dict:
    """A repetition's ``faults`` (those that hit it since ``t0``) and ``fault_time_s`` columns."""
    if faults is None:
        return {}
    return {"fault_time_s": round(t0, 4), "faults": ",".join(faults.hits(t0, faults.now()))}


def describe_cell(cell: Cell) -> str:
    p = cell.profile
    bw = f"trace {cell.trace.name}" if cell.trace else ("unshaped" if p.bandwidth_mbps is None
                                                          else f"{p.bandwidth_mbps:g} Mbit/s")
    extra = "".join(f" {v:g}{u}" for v, u in ((p.delay_ms, " ms"), (p.jitter_ms, " ms jitter"), (p.loss_pct, "% loss"))
                    if v)
    return bw + extra


def _msg(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# Stop signals received in this process. Python drops an exception raised by a signal handler
# while it runs code whose exceptions it ignores (an at-fork hook such as logging's, a __del__):
# the sweep's checks (stop_if_signalled) raise it again before the next repetition.
SIGNALLED: list[int] = []
RAISED: list[int] = []  # the signals an Interrupted has been raised for (by the handler or a check)
#: a stop signal that lands while the main thread runs gRPC's own Python code is handled again this
#: many seconds later instead of raised there: an exception inside gRPC's call bookkeeping (a future
#: being started, its result being collected) can leave a channel on which no call completes again,
#: and the stop then hangs shutting the nodes down over it
GRPC_RETRY_S = 0.05


def _in_grpc(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] == "grpc":
            return True
        frame = frame.f_back
    return False


def _raise_interrupted(signum, frame) -> None:
    SIGNALLED.append(signum)
    if _in_grpc(frame):
        if not RAISED:  # not yet stopping: try again once the main thread is out of gRPC
            retry = threading.Timer(GRPC_RETRY_S, _resend, (signum,))
            retry.daemon = True
            retry.start()
        return
    RAISED.append(signum)
    raise Interrupted(signum)


def _resend(signum: int) -> None:
    """The retry of a signal that landed in gRPC, while the run still handles it and has not stopped."""
    if not RAISED and signal.getsignal(signum) is _raise_interrupted:
        os.kill(os.getpid(), signum)


def stop_if_signalled() -> None:
    """Raise Interrupted for a stop signal received earlier, whatever became of its handler's raise."""
    if SIGNALLED:
        RAISED.append(SIGNALLED[0])
        raise Interrupted(SIGNALLED[0])


@contextmanager
def quiet_dropped_interrupts():
    """Within the block, an Interrupted that Python drops (it would print "Exception ignored" and a
    traceback) is dropped silently: SIGNALLED holds its signal, stop_if_signalled raises it again."""
    previous = sys.unraisablehook

    def hook(u) -> None:
        if not isinstance(u.exc_value, Interrupted):
            previous(u)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
