"""Single device: rank 0 runs the whole model; any other rank idles. The reference output and
the speed-up denominator for every other method."""

from __future__ import annotations

from typing import Any

import torch

from testbed.methods.base import Method


class Single(Method):
    name = "single"
    DEFAULTS: dict[str, Any] = {}

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        return self.model(inp) if self.rank == self.output_rank else None

    def analytic_bytes(self, tokens: int, batch: int = 1) -> dict[str, Any]:
        return {"per_block": [0] * self.cfg.n_layers, "total": 0}
