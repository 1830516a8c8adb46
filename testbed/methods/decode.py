"""Decode after prefill: greedy generation with the KV cache left where prefill put it.

A cache is per block a pair [k, v] of [B, t, width] tensors (k already rotated for rotary models).
``step`` runs one new token [B, 1] at global position ``pos`` through a block stack, appending its
K/V to the cache, and returns the next-token logits. Methods decide which rank holds which cache
and what crosses the network per token (see each method's ``_decode_step``):

- single: rank 0 holds the whole cache;
- tensor_parallel: every rank holds the K/V of its own KV heads (the prefill's split) and each
  token costs the two ring all-reduces per block of a [B, 1, D] sum;
- sequence_parallel (fp32, int8) and astra: the output rank (the last one) already computed K and
  V (astra: K^, V^ from the codes) of every prompt token during prefill, because its queries see
  all earlier chunks; it decodes alone from that cache and nothing crosses the network per token.
  The other ranks keep their chunks' caches and idle. (Sending the new token's query to each
  chunk and its partial attention back would cost one round trip per block per token to save
  attention over T/N keys, while every rank holds all weights: a loss at these sizes.)
- block_parallel: no decode (ConfigError): DeTransformer defines no cache hand-off for its
  decoupled blocks and this testbed does not invent one.
"""

from __future__ import annotations

import torch

from testbed.errors import check

NO_DECODE = ("block_parallel",)


def check_decodes(method: str, cfg, generate: int) -> None:
    """ConfigError unless ``method`` can generate ``generate`` tokens after prefill on ``cfg``."""
    check(isinstance(generate, int) and not isinstance(generate, bool) and generate >= 0, "generate", generate,
          "an integer >= 0")
    if generate:
        check(cfg.causal, "generate", generate, f"0 for {cfg.kind} (only causal LMs generate tokens)")
        check(method not in NO_DECODE, "generate", generate,
              f"0 for method {method} (it has no decode: its decoupled blocks define no KV cache hand-off)")


def step(model, cache: list[list[torch.Tensor]], ids: torch.Tensor, pos: int) -> torch.Tensor:
    """Logits [B, vocab] of one new token ``ids`` [B, 1] at position ``pos``; its K/V join ``cache``."""
    x = model.embed_positions(ids, pos)  # (B, 1, D)
    p = torch.tensor([pos])
    for blk, c in zip(model.blocks, cache):
        a = blk.attn
        h = blk.ln1(x)
        c[0] = torch.cat([c[0], a.rotate(a.k(h), p)], 1)  # (B, t+1, kv width)
        c[1] = torch.cat([c[1], a.v(h)], 1)
        x = x + a.o(a.mix(a.rotate(a.q(h), p), c[0], c[1], None))  # the newest token sees every key
        x = x + blk.mlp(blk.ln2(x))
    return model.output(x[:, -1])


def prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The single-device forward of the prompt, keeping each block's K/V: (logits [B, vocab], cache)."""
    from testbed.models.layers import causal_mask

    x = model.embed(ids)
    T = x.shape[1]
    pos = torch.arange(T)
    mask = causal_mask(pos, pos)
    cache = []
    for blk in model.blocks:
        a = blk.attn
        h = blk.ln1(x)
        k, v = a.rotate(a.k(h), pos), a.v(h)
        cache.append([k, v])
        x = x + a.o(a.mix(a.rotate(a.q(h), pos), k, v, mask))
        x = x + blk.mlp(blk.ln2(x))
    return model.output(x[:, T - 1]), cache


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The single-device greedy continuation [B, n] of prompt ``ids`` (the decode reference)."""
    logits, cache = prefill(model, ids)
    out, T = [], ids.shape[1]
    for i in range(n):
        nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        if i + 1 < n:
            logits = step(model, cache, nxt, T + i)
    return torch.cat(out, 1)
