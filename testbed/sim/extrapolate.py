"""Compute profiles for token counts and node counts too large to measure, fitted on measured ones.

The model (stated once, used for every method): the duration of compute segment
``j`` of a rank (segment j runs before the rank's collective j) is

    d_j = c0 + c1 * local + c2 * T + c3 * attn          (seconds, all c >= 0)

with T the input tokens and, per rank,
- token-split methods (sequence_parallel*, astra) and single: ``local`` = tokens the
  rank runs the MLP and projections for, ``attn`` = local * keys it attends to
  (T, or the end of its chunk for causal models);
- width-split methods (tensor_parallel, block_parallel): ``local`` = T/N (a 1/N
  slice of every matmul over all T tokens), ``attn`` = T^2/N.
``c2 * T`` covers work on all tokens that every rank repeats (embeddings,
LayerNorms over all tokens, K/V of gathered tokens). Coefficients are fitted per
(segment j, holds-the-output) by non-negative least squares on relative error,
over every rank of every measured (T, N) of the same model, method, params,
threads and batch. Serialization inside collectives is fitted once per family as
``s = a * messages + b * bytes``. Extrapolated profiles are marked as such and
list the measured keys they came from.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.sim.profiles import ComputeProfile, ProfileKey
from testbed.sim.synth import WIDTH_SPLIT, RankShape, Skeleton, skeleton

FEATURES = ("const_s", "per_local_token_s", "per_token_s", "per_attention_pair_s")


def features(method: str, shape: RankShape, tokens: int, nodes: int) -> list[float]:
    if method in WIDTH_SPLIT:
        return [1.0, tokens / nodes, float(tokens), tokens * tokens / nodes]
    return [1.0, float(shape.local_tokens), float(tokens), float(shape.local_tokens * shape.keys)]


def segments(trace: Trace) -> list[float]:
    """Compute seconds between collectives: entry j is spent before collective j, the last after all."""
    out = [0.0]
    for ev in trace.events:
        if isinstance(ev, Compute):
            out[-1] += ev.duration_s
        else:
            out.append(0.0)
    return out


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of features: best non-negative fit over feature subsets."""
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y * y))
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            sub = x[:, cols]
            if np.linalg.matrix_rank(sub) < k:
                continue
            coef, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if np.any(coef < 0):
                continue
            err = float(np.sum((sub @ coef - y) ** 2))
            if err < best_err - 1e-18:
                best = np.zeros(x.shape[1])
                best[list(cols)] = coef
                best_err = err
    return best


class Fit:
    """Fitted compute and serialization model of one profile family."""

    def __init__(self, measured: list[ComputeProfile]):
        if not measured:
            raise ConfigError("calibration", "no measured profiles", "run `testbed calibrate` for this model and method")
        key0 = measured[0].key
        self.method, self.basis = key0.method, [p.key for p in measured]
        samples: dict[tuple[int, bool], list[tuple[list[float], float]]] = defaultdict(list)
        ser_x, ser_y = [], []
        for prof in measured:
            k = prof.key
            sk = skeleton(k.model, k.method, k.params, k.tokens, k.nodes, k.batch)
            for r, tr in enumerate(prof.traces):
                if len(segments(tr)) != sk.n_segments(r):
                    raise ConfigError("calibration", f"{k.slug()}: rank {r} has {len(segments(tr)) - 1} collectives",
                                      f"{sk.n_segments(r) - 1} as the method's pattern (re-run `testbed calibrate`)")
                f = features(k.method, sk.shapes[r], k.tokens, k.nodes)
                for j, d in enumerate(segments(tr)):
                    samples[(j, sk.shapes[r].is_output)].append((f, d))
                for ev in tr.collectives():
                    ser_x.append([float(len(ev.ops)), float(ev.bytes_sent + ev.bytes_recv)])
                    ser_y.append(ev.serialize_s)
        self.coef = {g: self._fit(v) for g, v in samples.items()}
        self.serialize = nnls(np.array(ser_x), np.array(ser_y)) if ser_x else np.zeros(2)

    @staticmethod
    def _fit(rows: list[tuple[list[float], float]]) -> np.ndarray:
        x = np.array([f for f, _ in rows])
        y = np.array([d for _, d in rows])
        w = 1.0 / np.maximum(y, 1e-6)  # relative error: small and large token counts count alike
        return nnls(x * w[:, None], y * w)

    def segment_s(self, j: int, shape: RankShape, method: str, tokens: int, nodes: int) -> float:
        coef = self.coef.get((j, shape.is_output))
        if coef is None:  # e.g. a holder of the output never measured: use the other ranks' fit
            coef = self.coef.get((j, not shape.is_output))
        if coef is None:
            raise ConfigError("calibration", f"no measured segment {j}", "profiles of the same method and model")
        return float(np.dot(coef, features(method, shape, tokens, nodes)))

    def serialize_s(self, coll: Collective) -> float:
        return float(np.dot(self.serialize, [len(coll.ops), coll.bytes_sent + coll.bytes_recv]))

    def describe(self) -> dict:
        return {"model": "d_j = c0 + c1*local + c2*T + c3*attn per (segment, output rank); see testbed.sim.extrapolate",
                "features": list(FEATURES),
                "coef": {f"{j}{'/output' if o else ''}": [float(c) for c in v] for (j, o), v in sorted(self.coef.items())},
                "serialize": {"per_message_s": float(self.serialize[0]), "per_byte_s": float(self.serialize[1])}}


def fill(sk: Skeleton, fit: Fit) -> list[Trace]:
    """Per-rank traces of a skeleton with durations from the fit."""
    traces = []
    for r in range(sk.nodes):
        shape, events = sk.shapes[r], []
        for j, coll in enumerate(sk.collectives[r] + [None]):
            events.append(Compute(fit.segment_s(j, shape, sk.method, sk.tokens, sk.nodes)))
            if coll is not None:
                events.append(Collective(coll.kind, list(coll.ops), serialize_s=fit.serialize_s(coll)))
        traces.append(Trace(r, events))
    return traces


def extrapolate(key: ProfileKey, measured: list[ComputeProfile]) -> ComputeProfile:
    """The profile of ``key`` from measured profiles of its family (the model above)."""
    family = [p for p in measured if p.key.family() == key.family() and (p.key.nodes == 1) == (key.nodes == 1)]
    if len({(p.key.tokens, p.key.nodes) for p in family}) < 2:
        raise ConfigError("calibration", f"{len(family)} measured profiles of {key.model}/{key.method} "
                          f"{key.params_json} with {'1 node' if key.nodes == 1 else '2+ nodes'}",
                          "at least 2 different (tokens, nodes) points: run `testbed calibrate` with several --tokens")
    fit = Fit(family)
    sk = skeleton(key.model, key.method, key.params, key.tokens, key.nodes, key.batch)
    return ComputeProfile(key, fill(sk, fit), extrapolated=True, basis=fit.basis, meta={"fit": fit.describe()})
