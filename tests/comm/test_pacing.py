"""CpuPacer: a compute segment held to its CPU time / rate, on clocks the test drives."""

from __future__ import annotations

import pytest

from testbed.comm.trace import Collective, Compute, CpuPacer, Trace


class Clocks:
    """A process's CPU clock and the wall clock, advanced by hand; sleep advances the wall."""

    def __init__(self):
        self.cpu = self.wall = 0.0
        self.slept: list[float] = []

    def run(self, cpu_s: float, wall_s: float) -> None:
        self.cpu += cpu_s
        self.wall += wall_s

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.wall += s

    def pacer(self, rate: float) -> CpuPacer:
        return CpuPacer(rate, cpu_clock=lambda: self.cpu, wall_clock=lambda: self.wall, sleep=self.sleep)


def test_a_segment_faster_than_the_rate_is_held_to_cpu_over_rate():
    c = Clocks()
    p = c.pacer(0.25)  # a quarter of a core
    p.mark()
    c.run(cpu_s=0.004, wall_s=0.005)  # 4 ms of CPU in 5 ms: a fresh quota at host speed
    p.pace()
    assert c.slept == [pytest.approx(0.011)] and c.wall == pytest.approx(0.016)  # 4 ms / 0.25


def test_a_throttled_or_idle_segment_is_left_alone():
    c = Clocks()
    p = c.pacer(0.5)
    p.mark()
    c.run(cpu_s=0.010, wall_s=0.025)  # slower than 0.5 CPU-s per s already (throttled, contended)
    p.pace()
    p.mark()
    c.run(cpu_s=0.0, wall_s=0.003)  # nothing computed
    p.pace()
    assert c.slept == []


def test_threads_count_together_against_a_multicore_rate():
    c = Clocks()
    p = c.pacer(2.0)  # two cores' quota
    p.mark()
    c.run(cpu_s=0.040, wall_s=0.010)  # four threads busy for 10 ms
    p.pace()
    assert c.slept == [pytest.approx(0.010)]  # 40 ms of CPU at 2 CPU-s per s: 20 ms


def test_pace_before_any_mark_does_nothing_and_a_bad_rate_is_refused():
    c = Clocks()
    c.pacer(1.0).pace()
    assert c.slept == []
    for rate in (0, -1.0):
        with pytest.raises(ValueError, match="rate"):
            CpuPacer(rate)


def test_the_trace_paces_each_segment_before_recording_it():
    """Marks at start() and after every collective; paced at every collective and at finish(),
    so each Compute event is the held (device) time."""
    c = Clocks()
    trace = Trace(0, clock=lambda: c.wall, pacer=c.pacer(0.5))
    trace.start()
    c.run(cpu_s=0.002, wall_s=0.002)
    trace.close_compute()  # a collective begins
    c.run(cpu_s=0.001, wall_s=0.007)  # inside the collective: waiting, not paced
    trace.add(Collective("all_gather"))
    c.run(cpu_s=0.003, wall_s=0.004)
    trace.finish()
    computes = [e.duration_s for e in trace.events if isinstance(e, Compute)]
    assert computes == [pytest.approx(0.004), pytest.approx(0.006)]
    assert c.slept == [pytest.approx(0.002), pytest.approx(0.002)]



def test_a_wall_clock_trace_records_the_threads_cpu_of_each_segment():
    """Compute.cpu_s: the computing thread's CPU seconds in the segment, beside its wall time, where the
    trace times wall clock (nodes); a CPU-clock trace (calibration) leaves it out, as does its dict."""
    import time

    import torch

    trace = Trace(0)  # wall clock, as a node's
    trace.start()
    time.sleep(0.05)  # idle: wall, no CPU
    a = torch.randn(256, 256)
    t_end = time.thread_time() + 0.03
    while time.thread_time() < t_end:  # busy: CPU
        a = a @ a / 256
    trace.finish()
    (seg,) = trace.events
    assert 0.03 <= seg.cpu_s < seg.duration_s and seg.duration_s >= 0.08
    back = Trace.from_dict(trace.to_dict())
    assert back.events[0].cpu_s == seg.cpu_s and back == trace
    calib = Trace(0, clock=time.process_time)
    calib.start()
    t_end = time.thread_time() + 0.01
    while time.thread_time() < t_end:
        pass
    calib.finish()
    assert calib.events[0].cpu_s is None and calib.events[0].duration_s >= 0.01
    assert calib.to_dict()["events"] == [{"duration_s": calib.events[0].duration_s, "type": "compute"}]
    assert Trace.from_dict(calib.to_dict()).events[0].cpu_s is None
