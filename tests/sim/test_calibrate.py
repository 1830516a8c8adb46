"""Calibration: ranks take turns on the CPU; schedules of the real methods equal the synthesized ones."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.methods.job import JobSpec, RankRunner
from testbed.methods import METHODS
from testbed.sim.calibrate import CLOCK, measure, measure_interleaved, median_trace
from testbed.sim.profiles import ComputeProfile, ProfileKey, ProfileStore, code_fingerprint
from testbed.sim.synth import skeleton

PARAMS = {"astra": {"groups": 2, "codebook_size": 16}, "block_parallel": {"n_b": 2}}


def test_only_one_rank_computes_at_a_time(monkeypatch):
    """Within a job and across jobs: a rank computes only while every other rank waits for a message."""
    busy, peak, lock = [0], [0], threading.Lock()

    def work():
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.002)  # a compute segment; another rank computing now would raise the peak
        with lock:
            busy[0] -= 1

    def infer(self):  # RankRunner.infer over a method of short sleeps and real collectives
        self.comm.trace.start()
        for _ in range(3):
            work()
            self.comm.all_gather(torch.tensor([float(self.rank)]))
            work()
            self.comm.all_reduce(torch.ones(8))
        self.comm.trace.finish()

    monkeypatch.setattr(RankRunner, "infer", infer)
    jobs = [JobSpec("vit-tiny", "sequence_parallel", 4, 18, {}), JobSpec("vit-tiny", "sequence_parallel", 2, 18, {})]
    out = measure_interleaved(jobs, repetitions=2, warmup=1)
    assert [len(m.traces) for m in out] == [4, 2]
    assert peak[0] == 1


INTERLEAVED = [JobSpec("vit-tiny", "astra", 4, 18, PARAMS["astra"]), JobSpec("vit-tiny", "single", 1, 18, {}),
               JobSpec("gpt2-tiny", "sequence_parallel", 2, 13, {})]


def test_interleaved_jobs_take_turns_round_robin(monkeypatch):
    calls, inside, overlaps, lock = [], [], [], threading.Lock()
    infer = RankRunner.infer

    def recorded(self):
        with lock:
            calls.append(self.job.method)
            overlaps.extend(m for m in inside if m != self.job.method)  # another job mid-inference
            inside.append(self.job.method)
        try:
            return infer(self)
        finally:
            with lock:
                inside.remove(self.job.method)

    monkeypatch.setattr(RankRunner, "infer", recorded)
    order, said = itertools.count(), []
    out = measure_interleaved(INTERLEAVED, repetitions=2, warmup=1, probe=lambda: float(next(order)), log=said.append)
    # progress: the ranks built, then each round as it starts
    assert [m.split(" (")[0] for m in said] == [
        "building the ranks of 3 profile(s)", "warm-up of 3 profile(s), round-robin",
        "repetition 1/2 of 3 profile(s), round-robin", "repetition 2/2 of 3 profile(s), round-robin"]
    # inference i of every job before inference i + 1 of any, every rank of a job in its slot
    slot = [m for job in INTERLEAVED for m in [job.method] * job.world_size]
    assert calls == slot * 3
    assert overlaps == []  # never two jobs at once
    # one probe right before each timed inference (not the warm-up's), in schedule order
    assert [m.probes_s for m in out] == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    for job, m in zip(INTERLEAVED, out):  # each job's traces are its own schedule, as measured alone
        sk = skeleton(job.model, job.method, job.params, job.tokens, job.world_size)
        assert [[(c.kind, c.ops) for c in tr.collectives()] for tr in m.traces] == \
            [[(c.kind, c.ops) for c in ranks] for ranks in sk.collectives]


def test_interleaved_reraises_the_failure_and_stops_every_job(monkeypatch):
    infer, seen = RankRunner.infer, []

    def failing(self):
        seen.append(self.job.method)
        if self.job.method == "sequence_parallel" and self.rank == 1 and seen.count("sequence_parallel") > 2:
            raise ValueError("boom")
        return infer(self)

    monkeypatch.setattr(RankRunner, "infer", failing)
    before = threading.active_count()
    with pytest.raises(ValueError, match="boom"):
        measure_interleaved(INTERLEAVED, repetitions=3, warmup=1, timeout_s=30)
    assert seen.count("single") == 2  # no job went on to the next round after the failure
    assert threading.active_count() == before
    with pytest.raises(ConfigError, match="threads"):
        measure_interleaved([INTERLEAVED[0], JobSpec("vit-tiny", "single", 1, 18, {}, threads=2)])


def test_median_trace_and_schedule_changes():
    a = Trace(0, [Compute(1.0), Collective("all_gather", [("send", 1, 4)], serialize_s=0.1)])
    b = Trace(0, [Compute(3.0), Collective("all_gather", [("send", 1, 4)], serialize_s=0.3)])
    c = Trace(0, [Compute(2.0), Collective("all_gather", [("send", 1, 4)], serialize_s=0.2)])
    m = median_trace([a, b, c])
    assert m.events[0].duration_s == 2.0 and m.events[1].serialize_s == 0.2
    other = Trace(0, [Compute(1.0), Collective("all_gather", [("send", 1, 8)])])
    with pytest.raises(ConfigError):
        median_trace([a, other])


@pytest.mark.parametrize("model, tokens", [("vit-tiny", 18), ("gpt2-tiny", 13)])  # uneven chunks
@pytest.mark.parametrize("method", METHODS)
def test_synthesized_schedule_equals_the_methods_traces(model, tokens, method):
    for n in (1, 4):
        traces = measure(JobSpec(model, method, n, tokens, PARAMS.get(method, {})), repetitions=1, warmup=0)
        sk = skeleton(model, method, PARAMS.get(method, {}), tokens, n)
        for r, tr in enumerate(traces):
            assert [(c.kind, c.ops) for c in tr.collectives()] == [(c.kind, c.ops) for c in sk.collectives[r]]
            assert all(e.duration_s >= 0 for e in tr.events)


def test_store_round_trip(tmp_path):
    key = ProfileKey.of("vit-tiny", "astra", {"groups": 2}, 17, 2)
    traces = [Trace(r, [Compute(0.5), Collective("all_gather", [("send", 1 - r, 9), ("recv", 1 - r, 9)])])
              for r in range(2)]
    store = ProfileStore(tmp_path / "cal")
    assert store.get(key) is None and store.all() == []
    path = store.put(ComputeProfile(key, traces, meta={"note": "x", "code": code_fingerprint(), "clock": CLOCK}))
    assert path.parent == tmp_path / "cal" and "astra" in path.name
    back = store.get(key)
    assert back.key == key and not back.extrapolated and back.meta["note"] == "x" and not back.stale
    assert [t.to_dict() for t in back.traces] == [t.to_dict() for t in traces]
    assert store.measured(ProfileKey.of("vit-tiny", "astra", {"groups": 2}, 999, 8)) != []
    assert store.measured(ProfileKey.of("vit-tiny", "astra", {"groups": 4}, 17, 2)) == []
    with pytest.raises(ConfigError):
        ComputeProfile(key, traces[:1])
    # measured with other methods/models code: not fit material any more
    store.put(ComputeProfile(key, traces, meta={"code": "0000"}))
    assert store.get(key).stale
    assert store.measured(key) == [] and len(store.measured(key, current=False)) == 1
