"""How an emulated run's devices computed, as the simulator needs to know it to predict that run.

A compute profile (testbed.sim.calibrate) is the CPU time of each segment on a free core of
this host. An emulated run computed differently, and how is in its manifest:

- **time-dilated** (``time_dilation.factor`` F > 1, not oversubscribed): every device had
  its whole device (a CFS quota of speed x threads / F cores, testbed.net.cgroups), so there is
  no contention between nodes to model; compute runs at the device's speed. But CFS bandwidth
  control is not free: a forward pass throttled every slice takes more CPU time than one that
  runs through (caches and the VM's exits on every throttle), and what it costs moves from one
  run to the next. A run that measured it (its rows' ``device_probe_s``: the probe block timed
  inside the nodes under their quotas, beside the runner's free ``host_probe_s``) is charged what
  it measured (``measured_throttle``, ``EmulationModel.of_manifest``'s ``throttle``); older runs are
  charged ``THROTTLE_OVERHEAD``, measured by ``python -m testbed.bench.dilation`` (README,
  Benchmarks). It multiplies every compute segment.
- **undilated** (no dilation record, or factor 1): N nodes shared the machine's cores, and the
  busy ranks' compute is stretched by the share each got (``Simulator``'s ``shared_cpus``).

Both kinds of run also have **jitter**: the same compute segment takes a different time on each
rank (CFS periods, the other device pinned to the same core, the delay lines' CPU), and methods
that synchronise after every block wait for the slowest rank each time. Across the ranks of the
emulated references the spread of a segment grows as the square root of its length (std =
k x sqrt(d): 25 ms segments have a CV of 14%, 110 ms ones 7%), as if every slice period added an
independent delay; ``segment_jitter_k`` measures k from a run's traces, ``SimConfig.segment_jitter_k``
replays it (drawn per rank and segment). A run whose compute was paced (``emulation.pace_compute``)
spreads about a third as much: a held segment ends where its CPU time at the quota's rate says,
not where a slice happens to run out. The constants below were measured on one reference run
each and are applied to the others (stated there).

``EmulationModel.of_manifest`` reads that from a run directory's manifest; ``Simulator`` applies
it (``SimConfig.shared_cpus``, ``compute_scale`` and ``segment_jitter_k``).

Under dilation, compute depends on how it is cut by waits: the 13 short segments of a sharded
method at 197 tokens measure 1.0-1.1x their calibrated CPU time, one long ``single`` forward
1.17-1.30x and sharded methods at 1024 tokens 1.2-1.25x (results/reference/*, per-rank traces
against this host's calibration). A device that waited across a CFS period boundary starts with
a fresh slice and runs it at host speed (at most ``burst_bound_s`` sooner per segment); that
explains ASTRA at 197 tokens, whose waits carry a few hundred bytes, but a model of it alone
over-predicts the saving for methods that receive bulk data while they wait (their receiving
threads spend the same quota) and misses the slowdown of four devices computing at once on two
cores (shared caches and memory bandwidth). Neither is modelled: one ``compute_scale`` applies.
Runs made with ``emulation.pace_compute`` (the default since it exists) hold every segment to its
CPU time at the quota's rate (testbed.comm.trace.CpuPacer), which removes the fresh-slice burst.
What is left is the throttling overhead itself, and it is not one number: 10 blocks of the host
probe (testbed.models.probe) under a 3.75/10 ms quota took 0.83-1.19x (median 1.03) the CPU time
of the same on a free core, round by round (``testbed.bench.dilation`` part 5), and ``single`` in three paced delay sweeps
made within 40 minutes measured 0.41-0.59 s against 0.51 s predicted. Those three runs put the
critical rank's compute at 0.86-1.14 of the prediction per method (medians over cells; ``single``
1.01, 0.86 and 1.00 in turn), ASTRA at the low end (0.90-0.95); one ``compute_scale`` applies.

And every emulated inference has a **dispatch** cost outside the ranks' traces: the
orchestrator's request to every node, the node preparing the input and returning output and
trace, on devices confined like the rest (``dispatch_overhead_s`` measures it from a run's rows
and traces; ``SimConfig.dispatch_s`` adds it to every prediction).

Not modelled either: the emulated links' packet processing charged to the devices' compute. A
kernel that does not account interrupt time apart (CONFIG_IRQ_TIME_ACCOUNTING off, as on the
reference VM) charges the softirq work of every emulated link (bridges, htb, TCP) to the task it
interrupts, a device's compute thread and its quota: a fixed forward pinned in one host of the
star took 1.14x its idle-link CPU with TCP between the other hosts and 1.49x with TCP into its
own (``testbed.bench.interference``; ``emulation.network_core`` removes it there). In paced runs
the sharded methods' segments took more thread CPU than calibrated, beyond ``single``'s, by 0-14%
from one run to the next (``Compute.cpu_s``); keeping a core for the network barely moved that, so
most of it is not the network's charge and is not modelled (the quickstart's sequence-parallel
segments are 20-30% longer at 100-500 Mbit/s than at 20).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from testbed.errors import check

#: CPU-time overhead of CFS throttling by slice length (ms): CPU seconds of a throttled vit-base
#: forward / CPU seconds of the same forward unthrottled. Measured by ``testbed.bench.dilation``
#: part 1 on this kind of machine (2-core AMD EPYC VM; README, Benchmarks: "+18% CPU at 10 ms,
#: ~+5% at 25 ms, none at 100 ms"). Slices in between are interpolated linearly, shorter or longer
#: ones take the nearest measured value.
THROTTLE_OVERHEAD: dict[float, float] = {10.0: 1.18, 25.0: 1.05, 100.0: 1.0}

#: k of the segment jitter (sqrt-seconds, see the module docstring) of a time-dilated run: measured by
#: ``segment_jitter_k`` on results/reference/quickstart's traces (2.67x, 10 ms slices, made on a quiet
#: host); results/reference/astra_vit (not used for it) measures 0.0277. The quickstart made under
#: host load before it (in git history) measured 0.0204.
DILATED_JITTER_K = 0.0216
#: k of a time-dilated run whose compute was paced to the quota (``emulation.pace_compute``): every
#: segment is held to its CPU time at the quota's rate, so slices no longer decide where it ends.
#: Measured on results/reference/paced/quickstart; not used for it: paced/delay 0.0065, paced/loss
#: 0.0086, paced/astra_vit 0.0124 (1024 tokens: segments 5x longer)
PACED_JITTER_K = 0.0063
#: k of an undilated run (nodes contending for the cores): measured on
#: results/reference/undilated/quickstart (437 segments); undilated/astra_vit (not used) measures 0.0558
UNDILATED_JITTER_K = 0.0443
#: segments shorter than this are left out of the measurement (bookkeeping between collectives)
JITTER_MIN_SEGMENT_S = 0.005
#: device seconds per inference outside the ranks' traces in a time-dilated run: ``dispatch_overhead_s``
#: of results/reference/quickstart (197 tokens, 2.67x, 36 inferences). Not used for it: delay measures
#: 0.0117, loss 0.0151, astra_vit (1024 tokens: larger inputs and outputs) 0.0186.
DILATED_DISPATCH_S = 0.0105
#: the same of an undilated run: results/reference/undilated/quickstart; undilated/astra_vit measures 0.0048
UNDILATED_DISPATCH_S = 0.0040


def dispatch_overhead_s(rows: Any, traces: list[dict]) -> float:
    """Median over a run's inferences of latency minus the longest rank's traced time (compute,
    collectives, serialization): what the orchestrator and the node runtimes add per inference.
    ``rows``: the run's rows (a DataFrame with cell, repetition, latency_s); ``traces``: its traces."""
    import numpy as np

    latency = {(r.cell, r.repetition): r.latency_s for r in rows.itertuples() if r.status == "ok"}
    gaps = [latency[(t["cell"], t["repetition"])] - max(sum(e["duration_s"] for e in r["events"]) for r in t["ranks"])
            for t in traces if (t.get("cell"), t.get("repetition")) in latency]
    check(len(gaps) > 0, "traces", len(traces), "traces of the run's ok rows (same cell and repetition)")
    return float(np.median(gaps))


def segment_jitter_k(traces: list[dict]) -> float:
    """k of a run's compute jitter: over every compute segment of mean length >= JITTER_MIN_SEGMENT_S
    (segment j of each rank, ranks of one repetition of one cell), the median of
    std over ranks (n-1) / sqrt(mean over ranks). ``traces``: a run's traces (store.read_traces)."""
    import numpy as np

    ks: list[float] = []
    for t in traces:
        ranks = t["ranks"]
        if len(ranks) < 2 or t.get("method") == "single":
            continue
        segs = [[e["duration_s"] for e in r["events"] if e.get("type") == "compute"] for r in ranks]
        n = min(len(s) for s in segs)
        if n == 0:
            continue
        a = np.array([s[:n] for s in segs], dtype=float)
        mean = a.mean(axis=0)
        ok = mean >= JITTER_MIN_SEGMENT_S
        ks += (a.std(axis=0, ddof=1)[ok] / np.sqrt(mean[ok])).tolist()
    check(len(ks) > 0, "traces", len(traces), f"traces with compute segments of {JITTER_MIN_SEGMENT_S} s or more "
          "on two ranks or more")
    return float(np.median(ks))


def measured_throttle(rows: Any) -> float | None:
    """What CFS throttling cost a run's devices, as they measured it: the median over the run's rows of
    ``device_probe_s`` (the probe block timed inside every node at once, under its quota; median over
    the nodes) over the median of ``host_probe_s`` (the same block on a free thread of the runner,
    just before). Both are taken once per unit, seconds apart, so the host's drift between them is
    small; a single unit's ratio moves by more (the throttled block took 0.83-1.19x its free time from
    one round to the next in ``testbed.bench.dilation`` part 5), hence medians over the run. None where
    the rows lack either probe (runs made before the device probe existed, backends without nodes)."""
    import pandas as pd

    if "device_probe_s" not in rows or "host_probe_s" not in rows:
        return None
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    dev = pd.to_numeric(ok["device_probe_s"], errors="coerce").dropna()
    free = pd.to_numeric(ok["host_probe_s"], errors="coerce").dropna()
    if not len(dev) or not len(free):
        return None
    return float(dev.median()) / float(free.median())


def throttle_overhead(slice_ms: float) -> float:
    """The measured CPU overhead factor of CFS throttling at ``slice_ms`` (see THROTTLE_OVERHEAD)."""
    check(isinstance(slice_ms, (int, float)) and not isinstance(slice_ms, bool) and slice_ms > 0, "cpu_slice_ms",
          slice_ms, "a number of milliseconds > 0")
    pts = sorted(THROTTLE_OVERHEAD.items())
    if slice_ms <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if slice_ms <= x1:
            return y0 + (y1 - y0) * (slice_ms - x0) / (x1 - x0)
    return pts[-1][1]


@dataclass(frozen=True)
class EmulationModel:
    """How the devices of one emulated run computed: ``compute_scale`` multiplies every compute
    segment; ``shared_cpus`` (None: every device had its own) stretches the busy ranks' compute."""

    time_dilation: float = 1.0
    cpu_slice_ms: float | None = None
    shared_cpus: int | None = None
    compute_scale: float = 1.0
    why: str = "real devices: compute as calibrated"
    segment_jitter_k: float = 0.0
    dispatch_s: float = 0.0

    @property
    def burst_bound_s(self) -> float:
        """Most device time one post-wait segment can run too fast under dilation: a fresh quota of
        one slice at host speed, ``slice x (1 - 1/F)`` (0 undilated)."""
        if self.time_dilation <= 1 or not self.cpu_slice_ms:
            return 0.0
        return self.cpu_slice_ms / 1e3 * (1 - 1 / self.time_dilation)

    @classmethod
    def of_manifest(cls, manifest: dict[str, Any], throttle: float | None = None) -> "EmulationModel":
        """The model of a run from its manifest (testbed.experiment.manifest): dilated runs get the
        throttling overhead ``throttle`` their devices measured (``measured_throttle``; None: the
        constant for their slice) and no contention; undilated ones contention on the machine's
        cores (``machine.cpu_count``), and ``throttle`` does not apply to them."""
        check(throttle is None or (isinstance(throttle, (int, float)) and not isinstance(throttle, bool)
                                   and throttle > 0), "throttle", throttle, "a number > 0, or None")
        dil = manifest.get("time_dilation") or {}
        factor = float(dil.get("factor") or 1.0)
        cpus = manifest.get("machine", {}).get("cpu_count")
        cpus = int(cpus) if isinstance(cpus, int) and cpus >= 1 else None
        backend = (manifest.get("backend") or {}).get("name")
        if backend in ("sim", "inprocess"):  # nothing confined: inprocess ranks share the host as threads
            return cls(1.0, None, cpus if backend == "inprocess" else None, 1.0,
                       "in-process threads share the host's cores" if backend == "inprocess" else "simulated")
        if factor > 1 and not dil.get("oversubscribed"):
            emu = (manifest.get("config") or {}).get("emulation") or {}
            slice_ms = float(emu.get("cpu_slice_ms") or 10.0)
            constant = throttle_overhead(slice_ms)
            scale = constant if throttle is None else float(throttle)
            how = (f"compute x {scale:g}, the CPU overhead of CFS throttling at {slice_ms:g} ms slices" if throttle is None
                   else f"compute x {scale:.3f}, the CPU overhead of CFS throttling as the run's devices measured it "
                        f"(their probe under the quota over the host's, medians; the constant for {slice_ms:g} ms "
                        f"slices is {constant:g})")
            paced = bool(emu.get("pace_compute"))
            k = PACED_JITTER_K if paced else DILATED_JITTER_K
            return cls(factor, slice_ms, None, scale,
                       f"time-dilated {factor:g}x (compute {'' if paced else 'not '}paced to the quota): each device "
                       f"had its whole device (no contention); {how}; segment jitter k = {k:g} sqrt-s; dispatch "
                       f"{DILATED_DISPATCH_S * 1e3:g} ms per inference", k, DILATED_DISPATCH_S)
        return cls(factor, None, cpus, 1.0, (f"not dilated: nodes shared {cpus} cores (contention modelled)"
                   if cpus else "not dilated, core count unknown: no contention modelled")
                   + f"; segment jitter k = {UNDILATED_JITTER_K:g} sqrt-s; dispatch {UNDILATED_DISPATCH_S * 1e3:g} ms "
                   "per inference", UNDILATED_JITTER_K, UNDILATED_DISPATCH_S)
