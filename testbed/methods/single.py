"""Single device: rank 0 runs the whole model; any other rank idles. The reference output and
the speed-up denominator for every other method."""

from __future__ import annotations

from typing import Any

import torch

from testbed.methods import decode
from testbed.methods.base import CommSchedule, Method


class Single(Method):
    name = "single"
    DEFAULTS: dict[str, Any] = {}

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        if self.rank != self.output_rank:
            return None
        if self._keep_cache:
            out, self._cache = decode.prefill(self.model, inp)
            return out
        return self.model(inp)

    def _decode_step(self, ids, pos):
        return None if self.rank != self.output_rank else decode.step(self.model, self._cache, ids, pos)

    @classmethod
    def _schedule(cls, cfg, T, N, p, batch) -> CommSchedule:
        on_0 = [T if r == 0 else 0 for r in range(N)]
        return CommSchedule(cls.name, p, [[] for _ in range(N)], on_0, list(on_0), 0)

    def _summarize(self, sent: list[int]) -> dict[str, Any]:
        return {"per_block": [0] * self.cfg.n_layers, "total": 0}
