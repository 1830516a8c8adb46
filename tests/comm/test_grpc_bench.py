"""The collectives benchmark runs end to end (it checks both transports' results itself); no timing asserted."""

from __future__ import annotations

import subprocess

import pytest

from testbed.bench.collectives import COLLECTIVES, format_table, parse_sizes, run
from testbed.errors import ConfigError


def test_benchmark_runs_both_transports_between_worker_processes():
    launched = []

    def launch(rank, argv):  # the hook a Mininet runner replaces with host.popen
        launched.append((rank, argv[argv.index("--host") + 1]))
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    rows = run(2, [1024, 12], reps=1, launch=launch)
    assert launched == [(0, "127.0.0.1"), (1, "127.0.0.2")]
    assert [(r.collective, r.size_bytes) for r in rows] == [(c, s) for c in COLLECTIVES for s in (1024, 12)]
    assert all(r.ours_s > 0 and r.gloo_s > 0 and r.reps == 1 for r in rows)
    assert "ours/gloo" in format_table(rows)


def test_sizes_parse_and_bad_sizes_are_refused_by_name():
    assert parse_sizes("1K,64KiB,1M,12") == [1024, 65536, 1 << 20, 12]
    for bad in ("3", "1X", "0", ""):
        with pytest.raises(ConfigError) as info:
            parse_sizes(bad)
        assert info.value.field == "sizes"


@pytest.mark.root
def test_star_benchmark_reports_the_drops_and_retransmissions_of_each_profile():
    """Inside the 4-host star: a profile losing 10% of packets on every path shows its retransmissions
    (hundreds: 2 reps x 2 transports x 12 messages of 182 segments), a lossless one next to none (the
    counters come from the hosts' kernels, taken before and after each profile)."""
    from testbed.bench.collectives import run_star
    from testbed.net.profile import LinkProfile

    rows = run_star([256 * 1024], ("all_gather",), reps=2,
                    profiles=[LinkProfile(100, 1.0), LinkProfile(100, 1.0, loss_pct=10.0)])
    clean, lossy = rows
    for r in rows:
        for k in ("host_queue_drops", "switch_queue_drops", "tcp_retransmitted_segments", "tcp_loss_probes",
                  "tcp_timeouts"):
            assert isinstance(r[k], int) and r[k] >= 0
    assert clean["loss_pct"] == 0 and lossy["loss_pct"] == 10.0
    assert lossy["tcp_retransmitted_segments"] > 10 * max(1, clean["tcp_retransmitted_segments"])


def test_ceiling_benchmark_times_every_transport_at_the_receiver():
    """One link, four transports (socket, gloo, bare gRPC, ours): each size moved reps times by each
    (the first, untimed round checks the bytes), the receiver's times and the ping-pong's round trips
    come back, and the table puts them side by side."""
    from testbed.bench import ceiling

    result = ceiling.run([256 * 1024, 3 << 20], reps=2, rounds=ceiling.PING_BLOCK)
    times = result.times
    assert sorted(times) == [256 * 1024, 3 << 20]
    assert set(result.rtt) == set(ceiling.IMPLS)
    assert all(len(v) == ceiling.PING_BLOCK and all(t > 0 for t in v) for v in result.rtt.values())
    for per in times.values():
        assert set(per) == set(ceiling.IMPLS)
        assert all(len(v) == 2 and all(t > 0 for t in v) for v in per.values())
    table = ceiling.format_table(result)
    assert "round trip of 1 KiB" in table and "grpc/socket" in table and "ours/gloo" in table and "3 MiB" in table
