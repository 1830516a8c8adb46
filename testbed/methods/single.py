"""Single device: rank 0 runs the whole model; any other rank idles. The reference output and
the speed-up denominator for every other method."""

from __future__ import annotations

from typing import Any

import torch

from testbed.methods.base import CommSchedule, Method


class Single(Method):
    name = "single"
    DEFAULTS: dict[str, Any] = {}

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        return self.model(inp) if self.rank == self.output_rank else None

    @classmethod
    def _schedule(cls, cfg, T, N, p, batch) -> CommSchedule:
        on_0 = [T if r == 0 else 0 for r in range(N)]
        return CommSchedule(cls.name, p, [[] for _ in range(N)], on_0, list(on_0), 0)

    def _summarize(self, sent: list[int]) -> dict[str, Any]:
        return {"per_block": [0] * self.cfg.n_layers, "total": 0}
