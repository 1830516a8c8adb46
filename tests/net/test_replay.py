"""Bandwidth traces: CSV and Mahimahi parsing, lookup, and the replay thread's order of steps."""

from __future__ import annotations

import threading

import pytest

from testbed.errors import ConfigError
from testbed.net.replay import MIN_BANDWIDTH_MBPS, BandwidthTrace, TraceReplay, load_trace


def test_csv_trace_with_header(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("time_s,bandwidth_mbps\n0,10\n1.5,40\n3,5\n")
    t = load_trace(p)
    assert t.points == ((0, 10), (1.5, 40), (3, 5)) and t.duration_s == 4.5
    assert [t.bandwidth_at(x) for x in (0, 1.49, 1.5, 3.2, 4.6)] == [10, 10, 40, 5, 10]
    assert t.bandwidth_at(100, loop=False) == 5


def test_mahimahi_trace_is_binned_into_rates(tmp_path):
    p = tmp_path / "t.mahi"
    # 100 ms bins: 10 packets in the first, none in the second, 5 in the third (trace ends at 300 ms)
    stamps = [5] * 10 + [250, 260, 270, 280, 300]
    p.write_text("\n".join(map(str, stamps)) + "\n")
    t = load_trace(p, bin_ms=100)
    assert t.duration_s == 0.3
    rates = [bw for _, bw in t.points]
    assert rates[0] == pytest.approx(10 * 1500 * 8 / 0.1 / 1e6)  # 1.2 Mbit/s
    assert rates[1] == MIN_BANDWIDTH_MBPS and rates[2] == pytest.approx(0.6)


@pytest.mark.parametrize("text, field", [("0,10\n1,abc\n", "t.csv:2"), ("0,10\n0,20\n", "trace[1].time_s"),
                                         ("1,10\n", "trace.time_s"), ("0,0\n", "trace[0].bandwidth_mbps")])
def test_bad_csv_traces_name_the_problem(tmp_path, text, field):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_trace(p)
    assert e.value.field.endswith(field)


def test_replay_applies_every_step_in_order_without_looping():
    trace = BandwidthTrace.from_points([(0, 10), (0.02, 20), (0.04, 30)])
    applied, done = [], threading.Event()

    def apply(bw):
        applied.append(bw)
        if bw == 30:
            done.set()

    replay = TraceReplay(trace, apply, loop=False).start()
    assert done.wait(5)
    replay.stop()
    assert applied == [10, 20, 30] and [b for _, b, _ in replay.log] == [10, 20, 30]


def test_replay_reports_the_error_of_a_failed_step():
    def apply(_bw):
        raise RuntimeError("tc refused")

    replay = TraceReplay(BandwidthTrace.from_points([(0, 10)]), apply).start()
    replay._thread.join(5)
    with pytest.raises(RuntimeError, match="tc refused"):
        replay.stop()
