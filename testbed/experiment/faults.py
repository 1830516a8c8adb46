"""Scheduled faults: events at fixed times after a method's repetitions start.

An experiment's ``faults:`` lists events; every unit (one method in one cell) replays the
whole list from the moment its measured repetitions start (after its warm-up, as a bandwidth
trace does), so every method meets the same faults at the same device times::

    faults:
      - {kind: link_down, link: [h2, s1], at_s: 1.0, duration_s: 2}        # no packet crosses it for 2 s
      - {kind: link_profile, link: [h1, s1], at_s: 0.5, profile: {bandwidth_mbps: 5}, duration_s: 3}
      - {kind: node_kill, host: h2, at_s: 4}                                 # its node dies (SIGKILL)

Times are device seconds (under time dilation F they last F times longer on the wall clock).
``link_profile`` changes the named fields of both directions of the link (the rest keep the
cell's values); without ``duration_s`` it holds until the unit ends. ``link_down`` needs a
``duration_s``. ``node_kill`` fails the repetition in progress (the runner records it and
starts fresh nodes for the next unit). When a unit ends, links still down come back up and
changed profiles return to the cell's. Events that the unit's repetitions outlast never fire
in that unit.

A row's ``faults`` column names the events that hit its repetition: those active at some
moment between its start and its end (an event without a duration stays active until the
unit ends). The manifest's ``faults`` lists every event that fired, per unit, with the device
time it actually began (``fired_at_s``) and ended (``ended_at_s``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from testbed.errors import ConfigError, check
from testbed.experiment import fields as F
from testbed.net.profile import LinkProfile

KINDS = ("link_down", "link_profile", "node_kill")
PROFILE_FIELDS = ("bandwidth_mbps", "delay_ms", "jitter_ms", "loss_pct")
MAX_TIME_S = 86400.0
#: kind -> the target fields an event of that kind must have, and all it may have (besides kind, at_s, name)
REQUIRED_BY_KIND = {"link_down": ("link", "duration_s"), "link_profile": ("link", "profile"), "node_kill": ("host",)}
FIELDS_BY_KIND = {"link_down": ("link", "duration_s"), "link_profile": ("link", "profile", "duration_s"),
                  "node_kill": ("host",)}


@dataclass(frozen=True)
class FaultSpec:
    kind: str  # one of KINDS
    at_s: float  # device seconds after the unit's repetitions start
    link: tuple[str, str] | None = None  # link_down, link_profile: the link's two ends, as in the topology
    host: str | None = None  # node_kill: the host whose node is killed
    duration_s: float | None = None  # None: until the unit ends
    profile: tuple[tuple[str, float | None], ...] = ()  # link_profile: the fields that change
    name: str = ""  # what rows and the manifest call it (default: kind, target and time)

    @property
    def target(self) -> str:
        return "-".join(self.link) if self.link else str(self.host)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"kind": self.kind, "at_s": self.at_s}
        if self.link:
            d["link"] = list(self.link)
        if self.host:
            d["host"] = self.host
        if self.duration_s is not None:
            d["duration_s"] = self.duration_s
        if self.profile:
            d["profile"] = dict(self.profile)
        return {**d, "name": self.name}


def parse_faults(v: Any, path: str = "faults") -> tuple[FaultSpec, ...]:
    """The ``faults:`` list of an experiment file (shape and ranges; the topology is checked by check_faults)."""
    if v is None:
        return ()
    out = [_fault(f, F.join(path, i)) for i, f in enumerate(F.seq(v, path, "fault events, e.g. "
                                                                 "{kind: link_down, link: [h2, s1], at_s: 1, duration_s: 2}", 0))]
    seen: dict[str, int] = {}
    for i, f in enumerate(out):
        check(f.name not in seen, F.join(F.join(path, i), "name"), f.name, f"a name no other event has (faults[{seen.get(f.name)}])")
        seen[f.name] = i
    return tuple(out)


def _fault(v: Any, path: str) -> FaultSpec:
    d = F.mapping(v, path, {"kind": True, "at_s": True, "link": False, "host": False, "duration_s": False,
                            "profile": False, "name": False})
    kind = F.string(d["kind"], F.join(path, "kind"), KINDS)
    need, may = REQUIRED_BY_KIND[kind], FIELDS_BY_KIND[kind]
    for k in ("link", "host", "duration_s", "profile"):
        if k in d and k not in may:
            raise ConfigError(F.join(path, k), d[k], f"no such field for kind {kind} (its fields: {', '.join(may)})")
    for k in need:
        check(k in d, F.join(path, k), None, f"this field is required for kind {kind}")
    at = F.number(d["at_s"], F.join(path, "at_s"), 0, MAX_TIME_S)
    link = None
    if "link" in d:
        lp = F.join(path, "link")
        check(isinstance(d["link"], list) and len(d["link"]) == 2 and all(isinstance(x, str) and x for x in d["link"])
              and d["link"][0] != d["link"][1], lp, d["link"], "the two ends of a topology link, e.g. [h2, s1]")
        link = (d["link"][0], d["link"][1])
    host = F.string(d["host"], F.join(path, "host")) if "host" in d else None
    dur = F.optional(d.get("duration_s"), F.number, F.join(path, "duration_s"), 0, MAX_TIME_S, lo_open=True)
    prof: tuple = ()
    if "profile" in d:
        pp = F.join(path, "profile")
        pd_ = F.mapping(d["profile"], pp, {k: False for k in PROFILE_FIELDS})
        check(bool(pd_), pp, pd_, "at least one of " + ", ".join(PROFILE_FIELDS))
        try:  # each value alone must make a valid profile (jitter: against any delay)
            for k, x in pd_.items():
                LinkProfile(**{k: x, **({"delay_ms": 1e9} if k == "jitter_ms" else {})})
        except (ConfigError, TypeError) as e:
            field = e.field if isinstance(e, ConfigError) else next(iter(pd_))
            raise ConfigError(F.join(pp, field), pd_.get(field), getattr(e, "allowed", "a number")) from None
        prof = tuple((k, None if pd_[k] is None else float(pd_[k])) for k in PROFILE_FIELDS if k in pd_)
    name = F.string(d["name"], F.join(path, "name")) if "name" in d else ""
    f = FaultSpec(kind, at, link, host, dur, prof, name)
    return f if name else FaultSpec(kind, at, link, host, dur, prof, f"{kind}:{f.target}@{at:g}s")


def check_faults(faults: tuple[FaultSpec, ...], topology, nodes: int, backend: str,
                 kinds_by_backend: dict[str, tuple[str, ...]], traces: bool) -> None:
    """Every event's link or host exists in ``topology`` (and runs a node), and ``backend`` can inject
    its kind (``kinds_by_backend``: what each backend can inject)."""
    hosts = topology.host_names[:nodes]
    links = {frozenset((lk.a, lk.b)) for lk in topology.links}
    for i, f in enumerate(faults):
        p = f"faults[{i}]"
        takers = [b for b, kinds in kinds_by_backend.items() if f.kind in kinds]
        check(f.kind in kinds_by_backend[backend], F.join(p, "kind"), f.kind,
              f"{' | '.join(kinds_by_backend[backend]) or 'no fault'} with backend {backend} "
              f"({f.kind} needs backend {' or '.join(takers)})")
        check(not (traces and f.kind == "link_profile"), F.join(p, "kind"), f.kind,
              "link_down or node_kill in an experiment with sweep.traces (a trace sets every link's profile "
              "at each step, which would undo a link_profile fault)")
        if f.link is not None:
            check(frozenset(f.link) in links, F.join(p, "link"), list(f.link),
                  f"a link of topology {topology.name!r}: " + ", ".join(f"[{lk.a}, {lk.b}]" for lk in topology.links))
        if f.host is not None:
            check(f.host in hosts, F.join(p, "host"), f.host, f"a host that runs a node: {' | '.join(hosts)}")


class FaultTimeline:
    """One unit's faults, injected by a thread at their times; ``hits`` names those that touched a window.

    ``backend``: what injects (testbed.backends.base.Backend: link_down, link_up, set_link_profile,
    restore_link, kill_node). ``dilation``: wall seconds per device second.
    """

    def __init__(self, faults: tuple[FaultSpec, ...], backend, dilation: float = 1.0, hosts: list[str] | None = None):
        self.faults, self.backend, self.f = faults, backend, dilation
        self.hosts = hosts or []
        self.t0: float | None = None
        self.records: list[dict] = []  # per event that began: name, kind, target, at_s, fired_at_s, ...
        self._active: dict[int, dict] = {}  # event index -> its record, while not ended
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> "FaultTimeline":
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)
        self._thread.start()
        return self

    def now(self) -> float:
        """Device seconds since the repetitions started."""
        return (time.monotonic() - self.t0) / self.f if self.t0 is not None else 0.0

    def _steps(self) -> list[tuple[float, int, bool]]:
        steps = []
        for i, f in enumerate(self.faults):
            steps.append((f.at_s, i, True))
            if f.duration_s is not None:
                steps.append((f.at_s + f.duration_s, i, False))
        return sorted(steps, key=lambda s: (s[0], not s[2]))  # at equal times an end comes before a begin

    def _run(self) -> None:
        fired: dict[int, float] = {}  # event -> when it really began (device s)
        for t, i, begin in self._steps():
            if not begin and i in fired:  # a late begin still gets its whole duration
                t = max(t, fired[i] + self.faults[i].duration_s)
            if self._stop.wait(max(0.0, self.t0 + t * self.f - time.monotonic())):
                return
            if begin:
                fired[i] = self.now()
                self._begin(i)
            else:
                self._end(i)

    def _begin(self, i: int) -> None:
        f = self.faults[i]
        rec = {"event": i, "name": f.name, "kind": f.kind, "target": f.target, "at_s": f.at_s,
               "fired_at_s": round(self.now(), 4), "ended_at_s": None}
        with self._lock:
            self.records.append(rec)
            self._active[i] = rec
        try:
            if f.kind == "link_down":
                self.backend.link_down(*f.link)
            elif f.kind == "link_profile":
                self.backend.set_link_profile(*f.link, dict(f.profile))
            else:
                self.backend.kill_node(self.hosts.index(f.host))
        except Exception as e:  # noqa: BLE001 - a fault that could not be injected is recorded, the unit goes on
            rec["error"] = f"{type(e).__name__}: {e}"

    def _end(self, i: int) -> None:
        with self._lock:
            rec = self._active.pop(i, None)
        if rec is None:
            return
        f = self.faults[i]
        try:
            if f.kind == "link_down":
                self.backend.link_up(*f.link)
            elif f.kind == "link_profile":
                self.backend.restore_link(*f.link)
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["ended_at_s"] = round(self.now(), 4)

    def hits(self, start_s: float, end_s: float) -> list[str]:
        """Names of the events active at some moment in [start_s, end_s] (device seconds), in list order."""
        with self._lock:
            recs = list(self.records)
        out = []
        for rec in sorted(recs, key=lambda r: r["event"]):
            ended = rec["ended_at_s"]
            if rec["fired_at_s"] <= end_s and (ended is None or ended >= start_s):
                out.append(rec["name"])
        return out

    def stop(self, restore: bool = True) -> list[dict]:
        """Stop injecting; with ``restore`` bring back what is still broken (not a killed node: the runner
        restarts nodes). Returns every event that began, with its times."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            left = list(self._active)
        for i in left:
            if restore and self.faults[i].kind != "node_kill":
                self._end(i)
            else:
                self._active.pop(i, None)
                self.records[[r["event"] for r in self.records].index(i)]["ended_at_s"] = round(self.now(), 4)
        return list(self.records)
