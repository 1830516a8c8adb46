"""Which method, with which parameters, is fastest for a model, a token count, devices and a link?

``rank(sim, model, tokens, topology, profile, nodes=(2, 3, 4), devices=...)`` predicts every
candidate (``candidates``: every method at every node count it can split over, block parallel's
``n_b`` and ASTRA's G and K over their usual values) on the simulator and returns them fastest
first, each with the error band the simulator has shown against emulation for that method
(``ERROR_BAND_PCT``, measured by ``testbed validate`` on the committed emulated references).

This is the logic of ``testbed advise`` (testbed.experiment.advise holds the command line).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from testbed.errors import ConfigError, check
from testbed.net.profile import LinkProfile
from testbed.sim.simulator import Simulator

#: p90 |error| (percent) of the simulator's predicted latency per method, over the cells of the
#: committed time-dilated emulated references made as ``testbed run`` makes them by default (compute
#: paced; results/reference/<each of VALIDATED_REFERENCES>, ``testbed validate``,
#: validation/validation.csv of each; tests/sim/test_advise.py checks these numbers against those
#: files). A method not listed gets the overall p90 ("*").
VALIDATED_REFERENCES = ("paced/quickstart", "paced/astra_vit", "paced/delay", "paced/loss", "paced/llm_prefill")
ERROR_BAND_PCT: dict[str, float] = {
    "single": 10.5, "tensor_parallel": 8.1, "sequence_parallel": 7.4, "sequence_parallel_int8": 9.8,
    "block_parallel": 6.4, "astra": 8.3, "*": 9.8}
#: signed median errors are small (-4.2% tensor parallel to +3.3% single); the widest bands come from
#: the calibration itself (profiles of the same job measured at different times differ by up to 10%
#: for single and ~30% for ASTRA at 1024 tokens) and from cells the reference does not reproduce
#: (a slow phase of the host: in one loss cell single, which sends nothing, was predicted 29% low)

#: parameter grids tried per method (each is validated by the method; invalid ones are skipped)
ASTRA_GROUPS = (1, 4, 16, 32)
ASTRA_CODEBOOKS = (256, 1024)
BLOCK_NB = (1, 2, 3, 4, 6)


@dataclass(frozen=True)
class Candidate:
    method: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    nodes: int = 1
    params_json: str = "{}"

    @classmethod
    def of(cls, method: str, params: dict[str, Any] | None, nodes: int) -> "Candidate":
        p = dict(params or {})
        return cls(method, p, nodes, json.dumps(p, sort_keys=True))

    @property
    def label(self) -> str:
        p = self.params
        if self.method == "astra":
            extra = f" G={p['groups']} K={p['codebook_size']}"
        elif self.method == "block_parallel":
            extra = f" n_b={p['n_b']}"
        else:
            extra = ""
        return f"{self.method}{extra}" + ("" if self.method == "single" else f" N={self.nodes}")


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    latency_s: float
    band_pct: float  # expected |error| (p90 of validation) of this method's prediction
    comm_s: float
    mechanism: str  # sim/measured | sim/extrapolated

    @property
    def low_s(self) -> float:
        return self.latency_s * (1 - self.band_pct / 100)

    @property
    def high_s(self) -> float:
        return self.latency_s * (1 + self.band_pct / 100)


def candidates(model: str, tokens: int, nodes: Sequence[int], batch: int = 1) -> list[Candidate]:
    """Every (method, params, N) the methods accept for this model and size (``single`` once, on the
    smallest N: the other ranks idle, as in an experiment that runs it beside the others)."""
    from testbed.methods import METHODS
    from testbed.models import get_config
    from testbed.sim.synth import skeleton

    cfg = get_config(model)
    check(len(nodes) >= 1 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in nodes),
          "--nodes", list(nodes), "node counts >= 2 (single runs on one node anyway)")
    grid: list[Candidate] = [Candidate.of("single", {}, min(nodes))]
    for n in sorted(set(nodes)):
        for m in METHODS:
            if m == "single":
                continue
            if m == "astra":
                options = [{"groups": g, "codebook_size": k} for g in ASTRA_GROUPS for k in ASTRA_CODEBOOKS]
            elif m == "block_parallel":
                options = [{"n_b": b} for b in BLOCK_NB if b <= cfg.n_layers]
            else:
                options = [{}]
            for p in options:
                try:
                    skeleton(cfg, m, p, tokens, n, batch)  # the method's own checks (heads, dims, tokens)
                except ConfigError:
                    continue
                grid.append(Candidate.of(m, p, n))
    return grid


def error_band(method: str) -> float:
    """The p90 |error| (percent) validation measured for ``method`` (the overall one if not measured)."""
    return ERROR_BAND_PCT.get(method, ERROR_BAND_PCT.get("*", math.nan))


def rank(sim: Simulator, model: str, tokens: int, topology: Any, profile: LinkProfile,
         nodes: Sequence[int] = (2, 3, 4), speeds: Sequence[float] | None = None, batch: int = 1,
         threads: int = 1, log=None) -> tuple[list[Ranked], list[tuple[Candidate, str]]]:
    """Candidates fastest first, and those that could not be predicted (with why).

    ``topology``: a kind (star, ...) or a loaded testbed.net.topology.Topology; ``speeds``: compute
    slow-down per node (testbed.sim.simulator.speed_from_device), rank order, at least max(nodes)
    of them, or one for all; None: 1.0 (this host's core).
    """
    check(isinstance(profile, LinkProfile), "profile", profile, "a testbed.net.profile.LinkProfile")
    out, skipped = [], []
    for c in candidates(model, tokens, nodes, batch):
        if speeds is None:
            sp: float | list[float] = 1.0
        elif len(speeds) == 1:
            sp = float(speeds[0])
        else:
            check(len(speeds) >= c.nodes, "devices", len(speeds), f"at least {c.nodes} (one per node)")
            sp = [float(x) for x in speeds[:c.nodes]]
        try:
            res = sim.results(model=model, method=c.method, params=c.params, tokens=tokens, nodes=c.nodes,
                              topology=topology, profile=profile, speed=sp, threads=threads, batch=batch)
        except ConfigError as e:
            skipped.append((c, str(e)))
            continue
        key = sim.key(model=model, method=c.method, params=c.params, tokens=tokens, nodes=c.nodes, topology=topology,
                      profile=profile, threads=threads, batch=batch)
        out.append(Ranked(c, res[0].latency_s, error_band(c.method), res[0].critical.comm_s, sim.mechanism(key)))
        if log:
            log(f"{c.label}: {res[0].latency_s:.4g} s")
    out.sort(key=lambda r: (r.latency_s, r.candidate.label))
    return out, skipped


def separated(ranked: Sequence[Ranked], i: int) -> bool:
    """Whether candidate ``i`` is faster than ``i + 1`` beyond both error bands."""
    return i + 1 < len(ranked) and ranked[i].high_s < ranked[i + 1].low_s
