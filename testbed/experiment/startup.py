"""Where the time from `testbed run` to the first measured inference goes.

One ``Startup`` per command: the CLI starts its clock first thing, the spec checks time the
model build and the codebook calibration, the runner the backend's start (network build and
node servers) and the first job's load and warm-up, and stops the clock when the first
measured repetition is in. Whatever is not in a named phase is ``set-up`` (reading and checking
the spec, the reference output, writing codebook files, opening the store). The breakdown goes
into the manifest (``startup``) and the run's closing summary.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

PHASES = ("model build", "calibration", "backend start", "job load and warm-up")


class Startup:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.total_s: float | None = None  # to the first measured inference; None until then

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as part of phase ``name`` (only until the first measured inference)."""
        assert name in self.phases, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.total_s is None:
                self.phases[name] += time.perf_counter() - t0

    def first_inference(self) -> bool:
        """Stop the clock (the first call only); True if this call stopped it."""
        if self.total_s is not None:
            return False
        self.total_s = time.perf_counter() - self.t0
        return True

    def to_dict(self) -> dict:
        total = self.total_s if self.total_s is not None else time.perf_counter() - self.t0
        named = {k: round(v, 3) for k, v in self.phases.items()}
        return {"to_first_inference_s": round(total, 3), "set-up": round(total - sum(self.phases.values()), 3),
                **named}


def describe(d: dict) -> str:
    """One line from ``Startup.to_dict()``: total, then each phase."""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in d.items() if k != "to_first_inference_s")
    return f"{d['to_first_inference_s']:.1f} s to the first measured inference ({parts})"
