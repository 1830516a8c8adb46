"""Delay-line logic and NFQUEUE message parsing (pure; the daemon itself is tested as root)."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from testbed.net import nfqueue
from testbed.net.delayline import PathDelay


def test_fixed_delay_releases_after_exactly_the_delay():
    p = PathDelay(delay_ms=20)
    assert p.release_time(1.0) == pytest.approx(1.020)
    assert p.release_time(1.5) == pytest.approx(1.520)


def test_jitter_spreads_but_never_reorders():
    p = PathDelay(delay_ms=10, jitter_ms=8, rng=random.Random(1))
    arrivals = [i * 0.0005 for i in range(2000)]  # a packet every 0.5 ms, jitter 16 ms wide
    releases = [p.release_time(t) for t in arrivals]
    assert releases == sorted(releases)
    holds = [r - a for r, a in zip(releases, arrivals)]
    assert min(holds) >= 0.002 - 1e-9 and max(holds) <= 0.018 + 1e-9
    assert max(holds) - min(holds) > 0.010  # the jitter is really there


def test_lowering_the_delay_live_does_not_overtake_held_packets():
    p = PathDelay(delay_ms=50)
    first = p.release_time(0.0)
    p.set(5, 0)
    assert p.release_time(0.001) == first  # waits behind the packet held for 50 ms
    assert p.release_time(0.1) == pytest.approx(0.105)


@pytest.mark.parametrize("delay, jitter", [(-1, 0), (5, 6), (5, -1)])
def test_bad_settings_are_refused(delay, jitter):
    with pytest.raises(ValueError):
        PathDelay(delay, jitter)


def _packet_message(queue: int, packet_id: int, stamp: tuple[int, int] | None) -> bytes:
    attrs = nfqueue._attr(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 1) + b"\0")
    if stamp is not None:
        attrs += nfqueue._attr(nfqueue.NFQA_TIMESTAMP, struct.pack("!QQ", *stamp))
    body = struct.pack("!BBH", socket.AF_INET, 0, queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | nfqueue.NFQNL_MSG_PACKET, 0, 0, 0) + body


def test_packet_messages_parse_to_queue_id_and_arrival():
    raw = _packet_message(3, 41, (1700000000, 250000)) + _packet_message(5, 7, None)
    msgs = list(nfqueue._messages(memoryview(raw)))
    assert [m[0] for m in msgs] == [(3 << 8) | nfqueue.NFQNL_MSG_PACKET] * 2
    got = [nfqueue._packet_info(m[2][4:]) for m in msgs]
    assert got == [(41, 1700000000.25), (7, None)]
