"""Link profile: what one direction (or both) of an emulated link looks like. Units are in the names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from testbed.errors import ConfigError, check

MAX_BANDWIDTH_MBPS = 10_000.0


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class LinkProfile:
    bandwidth_mbps: float | None = None  # None: unshaped
    delay_ms: float = 0.0  # one-way
    jitter_ms: float = 0.0  # spread of the one-way delay; packets are not reordered
    loss_pct: float = 0.0  # random loss, percent of packets
    queue_packets: int | None = None  # None: sized from the bandwidth-delay product

    def __post_init__(self) -> None:
        bw = self.bandwidth_mbps
        check(bw is None or (_number(bw) and 0 < bw <= MAX_BANDWIDTH_MBPS),
              "bandwidth_mbps", bw, f"a number in (0, {MAX_BANDWIDTH_MBPS:g}] or null for unshaped")
        check(_number(self.delay_ms) and self.delay_ms >= 0, "delay_ms", self.delay_ms, "a number >= 0")
        check(_number(self.jitter_ms) and 0 <= self.jitter_ms <= max(self.delay_ms, 0) + 1e-9,
              "jitter_ms", self.jitter_ms, "a number >= 0 and <= delay_ms")
        check(_number(self.loss_pct) and 0 <= self.loss_pct < 100, "loss_pct", self.loss_pct,
              "a number in [0, 100)")
        q = self.queue_packets
        check(q is None or (isinstance(q, int) and not isinstance(q, bool) and q >= 2), "queue_packets", q,
              "an integer >= 2 or null")

    def to_dict(self) -> dict:
        return asdict(self)

    def dilated(self, factor: float) -> "LinkProfile":
        """This profile ``factor`` times slower in time: bandwidth / factor, delay and jitter x factor.

        Loss and the queue in packets stay (a queue sized from the bandwidth-delay product keeps
        its size, since bandwidth x delay is unchanged)."""
        if factor == 1:
            return self
        bw = self.bandwidth_mbps
        return replace(self, bandwidth_mbps=None if bw is None else bw / factor,
                       delay_ms=self.delay_ms * factor, jitter_ms=self.jitter_ms * factor)

    @property
    def shaped(self) -> bool:
        """True when the profile changes anything about the link."""
        return self != LinkProfile()

    @classmethod
    def from_dict(cls, d: object, where: str = "profile") -> "LinkProfile":
        """Build from a YAML mapping; unknown keys and bad values raise ConfigError naming ``where.key``."""
        allowed = [f.name for f in fields(cls)]
        check(isinstance(d, dict), where, d, f"a mapping with keys {', '.join(allowed)}")
        assert isinstance(d, dict)
        for key in d:
            check(key in allowed, f"{where}.{key}", d[key], f"known keys: {', '.join(allowed)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}.{e.field}", e.value, e.allowed) from None
