"""Link profile: what one direction (or both) of an emulated link looks like. Units are in the names."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from testbed.errors import check

MAX_BANDWIDTH_MBPS = 10_000.0


@dataclass(frozen=True)
class LinkProfile:
    bandwidth_mbps: float | None = None  # None: unshaped
    delay_ms: float = 0.0  # one-way
    jitter_ms: float = 0.0  # spread of the one-way delay; packets are not reordered
    loss_pct: float = 0.0  # random loss, percent of packets
    queue_packets: int | None = None  # None: sized from the bandwidth-delay product

    def __post_init__(self) -> None:
        bw = self.bandwidth_mbps
        check(bw is None or (isinstance(bw, (int, float)) and 0 < bw <= MAX_BANDWIDTH_MBPS),
              "bandwidth_mbps", bw, f"a number in (0, {MAX_BANDWIDTH_MBPS:g}] or null for unshaped")
        check(isinstance(self.delay_ms, (int, float)) and self.delay_ms >= 0, "delay_ms", self.delay_ms, "a number >= 0")
        check(isinstance(self.jitter_ms, (int, float)) and 0 <= self.jitter_ms <= max(self.delay_ms, 0) + 1e-9,
              "jitter_ms", self.jitter_ms, "a number >= 0 and <= delay_ms")
        check(isinstance(self.loss_pct, (int, float)) and 0 <= self.loss_pct < 100, "loss_pct", self.loss_pct,
              "a number in [0, 100)")
        q = self.queue_packets
        check(q is None or (isinstance(q, int) and q >= 2), "queue_packets", q, "an integer >= 2 or null")

    def to_dict(self) -> dict:
        return asdict(self)
