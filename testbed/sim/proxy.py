"""Compute profiles of models too large to build on this host, from a shallower proxy with the same blocks.

Llama-3-8B takes 32 GB in fp32: this host cannot build it once, let alone measure it. Its blocks are
all alike, so a proxy (``PROXIES``) with blocks of exactly the same shapes but only a few of them
(and a cut vocabulary: the head reads one token) is measured at the same tokens and nodes (or
extrapolated in tokens like any measured model), and the target's profile is read off it:

- the target's collectives are its own stated schedule (``Method.schedule``: GQA K/V widths, one
  round per block or per group of ``n_b`` blocks), only the compute between them comes from the proxy;
- compute segment j of a rank runs before its collective j. The first segment (embedding, the
  first block's start) and the last (the last block's end, the head) are the proxy's first and last;
  every middle one is the proxy's middle segment at the same place in the block pattern: the proxy's
  middle segments are cycled in order, in whole periods (collectives per block: 2 for tensor
  parallel's two all-reduces, 1 otherwise), so an attention segment maps to an attention segment.
  A proxy with no middle segment (block parallel with one group) lends its first segment (a group of
  ``n_b`` blocks after an embedding lookup that costs next to nothing);
- a rank without collectives (single) has one segment: the proxy's, times target blocks / proxy blocks.

What this leaves out, stated rather than hidden: the head of the real vocabulary (one token:
4096 x 128256 multiply-adds, ~1% of a block at 1024 tokens) and cache effects of a 32-block stack.
Profiles made this way are extrapolated (``sim/extrapolated`` rows) and name the proxy as their basis.
"""

from __future__ import annotations

from dataclasses import replace

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.sim.extrapolate import segments
from testbed.sim.profiles import ComputeProfile, ProfileKey
from testbed.sim.synth import skeleton

#: model -> the named config measured in its place (testbed.models.config)
PROXIES = {"llama-3-8b": "llama-3-8b-4l"}


def proxy_key(key: ProfileKey) -> ProfileKey | None:
    """The key to measure for ``key``'s model, or None if the model is measured itself."""
    proxy = PROXIES.get(key.model)
    return None if proxy is None else replace(key, model=proxy)


def segment_map(n_target: int, n_proxy: int, period: int) -> list[int]:
    """For each of ``n_target`` compute segments of a rank, the proxy segment it takes (see the module doc)."""
    if n_target == n_proxy:
        return list(range(n_target))
    middle = n_proxy - 2
    middle -= middle % period  # whole periods only: attention segments stay attention segments
    out = []
    for j in range(n_target):
        if j == 0 or j == n_target - 1:
            out.append(0 if j == 0 else n_proxy - 1)
        else:
            out.append(1 + (j - 1) % middle if middle > 0 else 0)
    return out


def from_proxy(key: ProfileKey, proxy: ComputeProfile) -> ComputeProfile:
    """The profile of ``key`` from ``proxy`` (a profile of PROXIES[key.model] at the same tokens and nodes)."""
    from testbed.models import get_config

    pk = proxy.key
    if (pk.method, pk.params_json, pk.tokens, pk.nodes, pk.threads, pk.batch) != \
            (key.method, key.params_json, key.tokens, key.nodes, key.threads, key.batch):
        raise ConfigError("proxy profile", pk.slug(), f"a profile of the same job as {key.slug()} on the proxy model")
    L_t, L_p = get_config(key.model).n_layers, get_config(pk.model).n_layers
    sk_t = skeleton(key.model, key.method, key.params, key.tokens, key.nodes, key.batch)
    sk_p = skeleton(pk.model, pk.method, pk.params, pk.tokens, pk.nodes, pk.batch)
    traces = []
    for r, tr in enumerate(proxy.traces):
        seg_p, coll_p, coll_t = segments(tr), tr.collectives(), sk_t.collectives[r]
        if len(coll_p) != len(sk_p.collectives[r]):
            raise ConfigError("proxy profile", f"{pk.slug()}: rank {r} has {len(coll_p)} collectives",
                              f"{len(sk_p.collectives[r])} as the method states (re-run the calibration)")
        if not coll_p:  # no collectives: one segment, all blocks
            traces.append(Trace(r, [Compute(seg_p[0] * L_t / L_p)]))
            continue
        period = max(1, round((len(coll_t) - len(coll_p)) / (L_t - L_p)))
        seg_of = segment_map(len(coll_t) + 1, len(seg_p), period)
        events: list = []
        for j, coll in enumerate(coll_t + [None]):
            events.append(Compute(seg_p[seg_of[j]]))
            if coll is not None:
                src = coll_p[min(seg_of[j], len(coll_p) - 1)]  # the proxy's collective after that segment
                if src.kind != coll.kind:
                    raise ConfigError("proxy profile", f"{pk.slug()}: rank {r} collective {j} is {src.kind}",
                                      f"{coll.kind} as the target's schedule (a different block pattern)")
                events.append(Collective(coll.kind, list(coll.ops), serialize_s=src.serialize_s))
        traces.append(Trace(r, events))
    return ComputeProfile(key, traces, extrapolated=True, basis=[pk],
                          meta={"proxy": {"model": pk.model, "blocks": L_p, "target_blocks": L_t,
                                          "how": "testbed.sim.proxy: compute segments of the proxy's blocks"}})
