"""SimPy replay of schedule traces over the network model.

One SimPy process per rank walks its trace in program order:
``Compute(d)`` holds the rank for ``d * speed_factor`` seconds (the time measured
on this host, scaled to the device); a collective's ``serialize_s`` is CPU time
too and is held the same way before its messages; a ``send`` puts the message
on its path at once and does not block the rank (the transport queues it, as
``Communicator._post`` does); a ``recv`` blocks until that message has arrived.
Messages of one ordered pair are received in order (one TCP stream per pair).

Links are not SimPy resources but calendars (``free_at`` per link): a message
reserves its first hop when it is issued and each later hop when its first bit
gets there (a scheduled callback). SimPy hands out those times in increasing
order, so every link serves messages first come, first served, and a message
costs one or two events instead of a process with a handful. For schedules where every rank
runs the same collectives (all the methods), lockstep.py replays the same model
vectorized, collective by collective; ``simulate(engine="auto")`` picks it where
it applies (tests check both replays agree on the methods' schedules).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import simpy

from testbed.comm.trace import Compute, Trace
from testbed.errors import ConfigError, check
from testbed.sim.lockstep import Lockstep, LockstepReplay, NotLockstepNetwork, compile_lockstep
from testbed.sim.network import Network, TcpModel, WireModel, tcp_stall_s, wire_bytes_with_loss

_C, _S, _R, _Z = 0, 1, 2, 3  # compiled op codes: compute(s), send(dst, bytes), recv(srcs), serialize(s)
WARM_SEED = 0x5EED0000  # seeds of the unmeasured inference a warm replay runs first (TcpModel.warm)


@dataclass
class RankStats:
    """Simulated seconds of one rank, split as the runtime's traces split them."""

    rank: int
    finish_s: float = 0.0  # when the rank finished its trace
    compute_s: float = 0.0  # compute segments, scaled to the device
    serialize_s: float = 0.0  # serialization inside collectives, scaled to the device
    wait_s: float = 0.0  # blocked in recvs, waiting for messages
    bytes_sent: int = 0  # application payload

    @property
    def comm_s(self) -> float:
        """Time inside collectives (serialization and waiting included), as Trace.comm_s."""
        return self.finish_s - self.compute_s


@dataclass
class SimResult:
    latency_s: float  # when the last rank finished, seconds after all started
    ranks: list[RankStats] = field(default_factory=list)
    bytes_sent: int = 0  # application payload bytes, all ranks
    bytes_on_wire: int = 0  # modelled bytes on all links: headers, retransmissions, ACKs included
    messages: int = 0

    @property
    def critical(self) -> RankStats:
        """The rank that finished last (its compute/comm split is the latency's split)."""
        return max(self.ranks, key=lambda s: s.finish_s)


@dataclass(frozen=True, eq=False)
class Schedule:
    """Validated traces of one inference, compiled once for many replays: the lockstep form
    (lockstep.py) when every rank runs the same collectives, and op lists for the SimPy replay
    (``programs``; compiled when first needed: a lockstep schedule of hundreds of ranks replays
    without them)."""

    traces: tuple[Trace, ...]
    lockstep: Lockstep | None = None
    _programs: list = field(default_factory=list, repr=False)  # [programs] once compiled

    @property
    def n(self) -> int:
        return len(self.traces)

    @property
    def programs(self) -> tuple[tuple[tuple, ...], ...]:
        if not self._programs:
            self._programs.append(tuple(tuple(p) for p in compile_traces(self.traces)))
        return self._programs[0]

    @classmethod
    def from_traces(cls, traces: Sequence[Trace | dict]) -> "Schedule":
        traces = tuple(Trace.from_dict(t) if isinstance(t, dict) else t for t in traces)
        check(len(traces) >= 1, "traces", len(traces), "one trace per node (at least one)")
        lockstep = compile_lockstep(list(traces))
        sched = cls(traces, lockstep)
        if lockstep is None:
            sched.programs  # noqa: B018 - validates the traces now
        else:  # the collectives matched the Communicator's plans rank by rank; check what they do not cover
            for r, tr in enumerate(traces):
                check(tr.rank == r, "traces", f"trace of rank {tr.rank} at position {r}", "traces in rank order")
            check(bool((lockstep.compute >= 0).all()) and bool((lockstep.serialize >= 0).all()),
                  "trace duration_s", float(min(lockstep.compute.min(), lockstep.serialize.min(initial=0))),
                  "a number of seconds >= 0")
        return sched


def compile_traces(traces: Sequence[Trace | dict]) -> list[list[tuple]]:
    """Validate traces and turn them into op lists (consecutive recvs merged, consecutive computes summed)."""
    n = len(traces)
    check(n >= 1, "traces", n, "one trace per node (at least one)")
    sends: dict[tuple[int, int], int] = defaultdict(int)
    recvs: dict[tuple[int, int], int] = defaultdict(int)
    programs = []
    for r, tr in enumerate(traces):
        tr = Trace.from_dict(tr) if isinstance(tr, dict) else tr
        check(tr.rank == r, "traces", f"trace of rank {tr.rank} at position {r}", "traces in rank order")
        ops: list[tuple] = []

        def compute(d: float, code: int) -> None:
            check(d >= 0, "trace duration_s", d, "a number of seconds >= 0")
            if d == 0:
                return
            if ops and ops[-1][0] == code:
                ops[-1] = (code, ops[-1][1] + d)
            else:
                ops.append((code, d))

        for ev in tr.events:
            if isinstance(ev, Compute):
                compute(ev.duration_s, _C)
                continue
            compute(ev.serialize_s, _Z)
            for kind, peer, nbytes in ev.ops:
                check(0 <= peer < n and peer != r, "trace peer", peer, f"another rank in [0, {n}) (rank {r})")
                check(nbytes >= 0, "trace payload bytes", nbytes, "an integer >= 0")
                if kind == "send":
                    sends[(r, peer)] += 1
                    ops.append((_S, peer, nbytes))
                elif kind == "recv":
                    recvs[(peer, r)] += 1
                    if ops and ops[-1][0] == _R:
                        ops[-1] = (_R, ops[-1][1] + (peer,))
                    else:
                        ops.append((_R, (peer,)))
                else:
                    raise ConfigError("trace op", kind, "send | recv")
        programs.append(ops)
    for pair in set(sends) | set(recvs):
        check(sends[pair] == recvs[pair], "traces", f"rank {pair[0]} sends {sends[pair]} messages to rank "
              f"{pair[1]}, which receives {recvs[pair]}", "matching sends and recvs")
    return programs


def _succeed_at(env: simpy.Environment, ev: simpy.Event, t: float) -> None:
    """Trigger ``ev`` at simulated time ``t`` >= now.

    ``Event.succeed`` fires at once; waking a receiver at its message's arrival that
    way would cost a second event (a Timeout). This schedules the event itself at
    ``t``, exactly as ``simpy.Timeout`` does in its constructor.
    """
    ev._ok, ev._value = True, None
    env.schedule(ev, delay=max(0.0, t - env.now))


class _Replay:
    def __init__(self, network: Network, wire: WireModel, tcp: TcpModel, speed: list[float], seed: int):
        self.env = simpy.Environment()
        self.net, self.wire, self.tcp, self.speed = network, wire, tcp, speed
        self.rng = random.Random(seed)
        self.free: dict[str, float] = defaultdict(float)  # link -> time it is free again
        self.inbox: dict[tuple[int, int], deque] = defaultdict(deque)  # (src, dst) -> [arrival time | None]
        self.waiting: dict[tuple[int, int], simpy.Event] = {}
        self.sent_until: dict[tuple[int, int], float] = defaultdict(float)  # pair -> its last message left
        self.cwnd: dict[tuple[int, int], float] = {}
        self.bytes_on_wire = 0.0
        self.messages = 0
        self._pair: dict[tuple[int, int], tuple] = {}
        self._sizes: dict[int, tuple[int, int, int]] = {}  # payload -> (segments, wire bytes, ACK bytes)
        self._tcp_costs = tcp.mode != "steady" or any(network.loss(a, b) > 0 for a in range(network.n)
                                                      for b in range(network.n) if a != b)

    def carry_over(self, prev: "_Replay", elapsed_s: float) -> None:
        """Start where ``prev`` (an inference that took ``elapsed_s``) left the connections: their
        windows, and their last sends that long before this inference's start."""
        self.cwnd = dict(prev.cwnd)
        self.sent_until = defaultdict(float, {k: v - elapsed_s for k, v in prev.sent_until.items()})

    def _pair_info(self, src: int, dst: int) -> tuple:
        """Per-pair constants: hops, rtt, bottleneck (inf: unshaped), loss (cached: paths never change in a run)."""
        key = (src, dst)
        if key not in self._pair:
            bw = self.net.bottleneck_bps(src, dst)
            self._pair[key] = (self.net.path(src, dst), self.net.rtt_s(src, dst),
                               math.inf if bw is None else bw, self.net.loss(src, dst))
        return self._pair[key]

    def _draw(self, trials: int, p: float) -> int:
        """Sampled losses: how many of ``trials`` packets are lost, each with probability p."""
        return sum(self.rng.random() < p for _ in range(int(trials)))

    def send(self, src: int, dst: int, payload: int) -> None:
        now, wire, tcp, pair = self.env.now, self.wire, self.tcp, (src, dst)
        hops, rtt, bw, p = self._pair_info(src, dst)
        sizes = self._sizes.get(payload)
        if sizes is None:
            sizes = self._sizes[payload] = (wire.segments(payload), wire.wire_bytes(payload), wire.ack_bytes(payload))
        segs, nbytes, acks = sizes
        if p > 0:  # retransmitted segments occupy the links too
            nbytes = wire_bytes_with_loss(tcp, segs, nbytes, p, self._draw)
        stall = 0.0
        if self._tcp_costs:
            cwnd = self.cwnd.get(pair, tcp.initial_window_segments)
            stall, cwnd = tcp_stall_s(tcp, wire, segs, nbytes, rtt, bw, p, cwnd, now - self.sent_until[pair],
                                      self._draw)
            if tcp.mode == "slow_start":
                self.cwnd[pair] = cwnd
        if wire.stack_bytes_per_s is not None:
            stall += wire.stack_extra_s(payload, nbytes, bw)
        self.bytes_on_wire += nbytes + acks
        self.messages += 1
        slot: list = [None]  # its arrival time, once the last hop is reserved
        self.inbox[pair].append(slot)
        ready = now + wire.per_message_s
        self._hop((pair, hops, nbytes + acks, stall, slot), 0, ready, ready)

    def _hop(self, msg: tuple, k: int, start: float, prev_end: float) -> None:
        """Reserve hop k of a message whose first bit reaches it at ``start`` (fluid cut-through).

        Hop 0 is reserved when the message is issued; a later hop when the first bit
        gets there (a scheduled callback), so each hop serves messages in the order
        they reach it, not the order they were issued.
        """
        pair, hops, nbytes, stall, slot = msg
        if k == len(hops):  # a path without hops (nothing shaped): there at once
            slot[0] = prev_end + stall
            self._deliver(pair)
            return
        h = hops[k]
        s = max(start, self.free[h.resource])
        e = s if h.bandwidth_bps is None else s + nbytes * 8 / h.bandwidth_bps
        if e < prev_end:  # the last bit cannot leave before it came in
            e = prev_end
        self.free[h.resource] = e
        if k == 0:
            self.sent_until[pair] = e
        d = h.delay_s
        if h.jitter_s and self.tcp.loss_mode == "sampled":
            d += self.rng.uniform(-h.jitter_s, h.jitter_s)
        start, prev_end = s + d, e + d
        if k + 1 < len(hops):
            if start > self.env.now:
                ev = self.env.timeout(start - self.env.now)
                ev.callbacks.append(lambda _e: self._hop(msg, k + 1, start, prev_end))
            else:
                self._hop(msg, k + 1, start, prev_end)
            return
        slot[0] = prev_end + stall
        self._deliver(pair)

    def _deliver(self, pair: tuple[int, int]) -> None:
        q = self.inbox[pair]
        if pair in self.waiting and q[0][0] is not None:  # the receiver waits for this stream's next message
            _succeed_at(self.env, self.waiting.pop(pair), q[0][0])

    def rank(self, r: int, ops: Sequence[tuple], stats: RankStats):
        env, speed = self.env, self.speed[r]
        for op in ops:
            code = op[0]
            if code == _C:
                stats.compute_s += op[1] * speed
                yield env.timeout(op[1] * speed)
            elif code == _Z:
                stats.serialize_s += op[1] * speed
                yield env.timeout(op[1] * speed)
            elif code == _S:
                stats.bytes_sent += op[2]
                self.send(r, op[1], op[2])
            else:  # the recvs of a run have no op between them: wait for all, then go on
                ready = t_wait = env.now
                for src in op[1]:
                    q = self.inbox[(src, r)]
                    while not q or q[0][0] is None:  # not sent yet, or still on its way through the hops
                        ev = self.waiting[(src, r)] = env.event()
                        yield ev
                    ready = max(ready, q.popleft()[0])  # max: a stream delivers in order
                if ready > env.now:
                    yield env.timeout(ready - env.now)
                stats.wait_s += env.now - t_wait
        stats.finish_s = env.now


ENGINES = ("auto", "simpy", "lockstep")


def simulate(traces: Schedule | Sequence[Trace | dict], network: Network, wire: WireModel | None = None,
             tcp: TcpModel | None = None, speed: float | Sequence[float] = 1.0, seed: int = 0,
             engine: str = "auto") -> SimResult:
    """Replay one inference: ``traces[r]`` is rank r's schedule (or a compiled ``Schedule``).

    Returns simulated times in seconds. ``speed`` scales compute per device (3.0: a
    device three times slower than this host), one number for all or one per rank.
    ``seed`` drives sampled loss and jitter. ``engine``: ``simpy`` replays message by
    message (any schedule, any topology); ``lockstep`` replays collective by collective
    in numpy (lockstep.py; schedules where all ranks run the same collectives, links
    used at one hop position); ``auto`` takes lockstep where it applies, else simpy.
    """
    check(engine in ENGINES, "engine", engine, " | ".join(ENGINES))
    n = network.n
    wire = WireModel() if wire is None else wire
    tcp = TcpModel() if tcp is None else tcp
    factors = [speed] * n if isinstance(speed, (int, float)) else list(speed)
    check(len(factors) == n and all(isinstance(f, (int, float)) and f > 0 for f in factors),
          "speed_factors", speed, f"a number > 0 or {n} numbers > 0 (one per node)")
    schedule = traces if isinstance(traces, Schedule) else Schedule.from_traces(traces)
    check(schedule.n == n, "traces", schedule.n, f"one trace per node of the topology ({n})")
    warm = tcp.warm and tcp.mode == "slow_start"  # only windows carry over
    if engine != "simpy":
        check(engine == "auto" or schedule.lockstep is not None, "engine", engine,
              "simpy or auto for schedules whose ranks run different collectives")
        if schedule.lockstep is not None:
            try:
                replay = LockstepReplay(network, wire, tcp, np.array(factors, dtype=float), WARM_SEED + seed)
                if warm and replay.windows_matter():
                    replay.carry_over(float(replay.run(schedule.lockstep)["finish_s"].max()), seed)
                else:
                    replay.rng = np.random.default_rng(seed)
                return _lockstep_result(replay, schedule.lockstep)
            except NotLockstepNetwork as e:
                check(engine == "auto", "engine", engine, f"simpy or auto here: {e}")
    speeds = [float(f) for f in factors]
    sim = _Replay(network, wire, tcp, speeds, seed)
    if warm:  # the inference before this one: the connections' windows carry over
        first, prev = _run(_Replay(network, wire, tcp, speeds, WARM_SEED + seed), schedule)
        sim.carry_over(prev, first.latency_s)
    return _run(sim, schedule)[0]


def _run(sim: "_Replay", schedule: Schedule) -> tuple[SimResult, "_Replay"]:
    """Replay ``schedule`` once on ``sim``; the result and the replay (its connections' state)."""
    n = schedule.n
    stats = [RankStats(r) for r in range(n)]
    procs = [sim.env.process(sim.rank(r, schedule.programs[r], stats[r])) for r in range(n)]
    sim.env.run()
    stuck = [r for r, p in enumerate(procs) if p.is_alive]
    if stuck:  # only possible for traces whose recvs wait on each other in a cycle
        raise ConfigError("traces", f"ranks {stuck} never finish (recv order deadlocks)", "traces of one real run")
    res = SimResult(latency_s=max(s.finish_s for s in stats), ranks=stats,
                    bytes_sent=sum(s.bytes_sent for s in stats), bytes_on_wire=round(sim.bytes_on_wire),
                    messages=sim.messages)
    return res, sim


def _lockstep_result(replay: LockstepReplay, ls: Lockstep) -> SimResult:
    out = replay.run(ls)
    stats = [RankStats(r, float(out["finish_s"][r]), float(out["compute_s"][r]), float(out["serialize_s"][r]),
                       float(out["wait_s"][r]), int(out["bytes_sent"][r])) for r in range(ls.n)]
    return SimResult(latency_s=max(s.finish_s for s in stats), ranks=stats,
                     bytes_sent=sum(s.bytes_sent for s in stats), bytes_on_wire=round(replay.bytes_on_wire),
                     messages=replay.messages)
