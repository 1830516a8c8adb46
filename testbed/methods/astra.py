"""ASTRA (Liu, Zhang, Ganesan, Guan, arXiv 2505.19342): sequence parallelism with vector-quantized
exchange and mixed-precision attention. The paper's algorithm, steps 1-7:

1. Tokens split into N contiguous chunks (sizes differ by at most one); all weights everywhere.
2. ViT with ``dct`` (Distributed Class Tokens): each rank prepends its own copy of the CLS token
   to its chunk of PATCH tokens; CLS copies are never exchanged inside the blocks; at the end the N
   final CLS vectors are all-gathered ([B, D] fp32 each) and averaged before the classifier.
   Without ``dct`` the CLS token is token 0 of rank 0's chunk and is quantized like any token.
3-4. Per block, h = LN1(x_local); the local non-CLS tokens are split into G groups, each replaced
   by the index of its nearest codebook entry (vq.quantize), bit-packed to b = ceil(log2 K) bits
   (vq.pack_codes) behind an 8-byte header, and all-gathered: ONE round per block, per rank
   ceil(B*t_local*G*b/8) + 8 bytes to each peer.
5. Receivers look codes up in their own codebook copy (h^) and compute K^ = h^ Wk, V^ = h^ Wv;
   local queries attend over [local K, V in full precision || non-local K^, V^], with the global
   causal mask for causal LMs. Llama-family receivers rotate K^ at the senders' true positions (every
   rank knows every chunk's start) and share KV heads among query heads (GQA); the codes are of the
   block's RMSNorm output, like LN1's for GPT-2.
6. Output projection, residual, LN2 and MLP on local tokens only.
7. Output on rank 0 (ViT) or on the last rank (GPT-2 prefill: logits of the last prompt token).

Params: ``groups`` (G, default 1), ``codebook_size`` (K, default 1024), ``dct`` (default True for
ViT; GPT-2 has no CLS token), ``lookup_tables`` ("auto", True, False): since h^ is a sum of
per-group codebook entries, [K^ | V^] = sum_g T[g, code_g] with tables T[g] = C_g [Wk | Wv][:, g]^T
(+ biases in group 0) [G, K, 2D] precomputed at build time; this is the same math as the direct
path (tested) and turns the K/V projection of non-local tokens into lookups. "auto" uses tables when they fit in 256 MiB
for the whole model. ``calibration_samples``: inputs k-means fits to when no codebook file is given.
Codebooks come from ``codebook_path`` (vq.load_codebooks; G and K then default to the file's) or,
if None, from vq.fit_codebooks at build time (deterministic, but every rank repeats it: the
runner should fit them once and pass the path).
"""

from __future__ import annotations

import struct
import time
from typing import Any

import torch
import torch.nn.functional as F

from testbed.errors import CommError, check
from testbed.methods import decode, vq
from testbed.methods.base import (FP32_BYTES, CommSchedule, Method, gathers, global_mask, packed_bytes, parse_params,
                                  stack, token_chunks)

HEADER = struct.Struct("<BBHI")  # version, bits per code, groups, number of token vectors (B*t)
HEADER_BYTES = HEADER.size  # 8
_VERSION = 1
_TABLE_BUDGET_BYTES = 256 << 20
_VQ_KEYS = ("encode_s", "decode_s", "encode_cpu_s", "decode_cpu_s")


class _Timer:
    """Adds wall and calling-thread CPU seconds of a with-block to ``acc[name + '_s' / '_cpu_s']``."""

    def __init__(self, acc: dict[str, float], name: str):
        self.acc, self.name = acc, name

    def __enter__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc) -> None:
        self.acc[self.name + "_s"] += time.perf_counter() - self.t0
        self.acc[self.name + "_cpu_s"] += time.thread_time() - self.c0


class Astra(Method):
    name = "astra"
    DEFAULTS: dict[str, Any] = {"groups": None, "codebook_size": None, "dct": None, "lookup_tables": "auto",
                                "calibration_samples": 2}

    FALLBACK: dict[str, int] = {"groups": 1, "codebook_size": 1024}  # G, K without params or codebook file

    def __init__(self, model, params, rank, world_size, comm, tokens, codebook_path=None):
        super().__init__(model, params, rank, world_size, comm, tokens, codebook_path)
        p = self.params
        self.groups, self.codebook_size, self.dct = p["groups"], p["codebook_size"], p["dct"]
        self.bits = vq.code_bits(self.codebook_size)
        self.cls = 1 if self.dct else 0  # leading local tokens that are never exchanged
        self.chunks = token_chunks(tokens - self.cls, world_size)  # over exchanged tokens
        self.codebooks = self._codebooks(tokens)
        self.quantizers = [vq.Quantizer(cb) for cb in self.codebooks]
        self.tables = self._tables() if self._use_tables() else None
        # VQ time of the last forward: wall seconds, and CPU seconds of the calling thread (the
        # whole VQ work only with 1 torch thread; robust to other load on the machine)
        self.vq_s = dict.fromkeys(_VQ_KEYS, 0.0)

    # -- params and schedule --------------------------------------------------------------------
    @classmethod
    def resolve_params(cls, params, cfg=None, codebook: tuple[str, int, int] | None = None) -> dict[str, Any]:
        """``codebook``: (path, groups, codebook_size) of a codebook file; G and K then come from it."""
        p = parse_params(cls.name, params, cls.DEFAULTS)
        if codebook is not None:
            path, *shape = codebook
            for key, have in zip(("groups", "codebook_size"), shape):
                check(p[key] in (None, have), key, p[key], f"{have} (the codebook file {path!r} has {key}={have})")
                p[key] = have
        for key, fallback in cls.FALLBACK.items():
            p[key] = fallback if p[key] is None else p[key]
        G, K = p["groups"], p["codebook_size"]
        D = None if cfg is None else cfg.dim
        check(isinstance(G, int) and not isinstance(G, bool) and G >= 1 and (D is None or D % G == 0), "groups", G,
              f"a positive divisor of the hidden size D={D}" if D else "a positive integer")
        check(isinstance(K, int) and not isinstance(K, bool) and 2 <= K <= 1 << 24, "codebook_size", K,
              "an integer K in 2..2^24")
        if cfg is not None:
            vit = cfg.kind == "vit"
            p["dct"] = vit if p["dct"] is None else p["dct"]
            check(p["dct"] in (True, False), "dct", p["dct"], "true or false")
            check(vit or not p["dct"], "dct", p["dct"], "false for causal LMs (Distributed Class Tokens need a CLS token)")
        else:
            check(p["dct"] in (None, True, False), "dct", p["dct"], "true or false")
        check(p["lookup_tables"] in ("auto", True, False), "lookup_tables", p["lookup_tables"], "'auto', true or false")
        n = p["calibration_samples"]
        check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "calibration_samples", n, "an integer >= 1")
        return p

    @classmethod
    def _schedule(cls, cfg, T, N, p, batch) -> CommSchedule:
        cls_tokens = 1 if p["dct"] else 0  # a local CLS copy per rank, never exchanged
        if cls_tokens:
            check(N <= T - 1, "world_size", N, f"1..{T - 1}: at most one rank per patch token (tokens={T} incl. CLS)")
        chunks = token_chunks(T - cls_tokens, N)
        bits = vq.code_bits(p["codebook_size"])
        block = gathers([message_bytes(batch * (e - s), p["groups"], bits) for s, e in chunks])
        calls = [block] * cfg.n_layers
        if cls_tokens:  # the N final CLS vectors [B, D] fp32
            calls.append(gathers([batch * cfg.dim * FP32_BYTES] * N))
        return CommSchedule(cls.name, p, stack(calls, N), [e - s + cls_tokens for s, e in chunks],
                            [e + cls_tokens if cfg.causal else T for _, e in chunks], N - 1 if cfg.causal else 0)

    def _summarize(self, sent: list[int]) -> dict[str, Any]:
        L = self.cfg.n_layers
        blocks, final = sent[:L], sum(sent[L:])
        return {"per_block": blocks, "final": final, "total": sum(blocks) + final}

    # -- build --------------------------------------------------------------------------------
    def _resolve(self, params, codebook_path: str | None) -> dict[str, Any]:
        parse_params(self.name, params, self.DEFAULTS)  # unknown keys fail before the file is read
        self._file = vq.load_codebooks(codebook_path) if codebook_path else None
        if self._file is None:
            return self.resolve_params(params, self.cfg)
        cb = self._file[0]
        vq.check_codebooks(cb, self.cfg.n_layers, self.cfg.dim, "codebook_path")
        return self.resolve_params(params, self.cfg, codebook=(codebook_path, cb.shape[1], cb.shape[2]))

    def _codebooks(self, tokens: int) -> torch.Tensor:
        if self._file is not None:
            return self._file[0].contiguous()
        return vq.fit_codebooks(self.model, self.groups, self.codebook_size, tokens,
                                n_samples=self.params["calibration_samples"])

    def _use_tables(self) -> bool:
        want = self.params["lookup_tables"]
        size = 2 * self.cfg.n_layers * self.groups * self.codebook_size * self.cfg.kv_dim * FP32_BYTES
        return want is True or (want == "auto" and size <= _TABLE_BUDGET_BYTES)

    @torch.no_grad()
    def _tables(self) -> list[torch.Tensor]:
        """Per block a table [G*K, 2D]: row g*K + c = C[g, c] @ [Wk | Wv][:, g-th D/G inputs]^T, and
        group 0's rows also hold [bk | bv] (every token has exactly one group-0 code), so that
        [K^ | V^] of a token is exactly the sum of its G rows: one embedding_bag, no extra pass."""
        G, K, d = self.codebooks.shape[1:]
        out = []
        for l, blk in enumerate(self.model.blocks):
            k, v = blk.attn.k, blk.attn.v
            w = torch.cat([k.weight, v.weight]).T.reshape(G, d, -1)  # (G, d, 2D): input rows of group g
            table = torch.bmm(self.codebooks[l], w).reshape(G * K, -1)
            if k.bias is not None:  # Llama has none; Qwen2 and GPT-2 do
                table[:K] += torch.cat([k.bias, v.bias])
            out.append(table)
        return out

    def describe(self) -> str:
        return (f"G={self.groups}, K={self.codebook_size}, dct={self.dct}, "
                f"tables={'on' if self.tables is not None else 'off'}")

    # -- one inference --------------------------------------------------------------------------
    def _local_embed(self, inp: torch.Tensor) -> torch.Tensor:
        s, e = self.chunks[self.rank]
        if self.cfg.kind != "vit":
            return self.model.embed_positions(inp[:, s:e], s)
        emb = self.model.embed(inp)  # (B, T, D): every rank holds the image; see base.embed_range
        if self.dct:
            return torch.cat([emb[:, :1], emb[:, 1 + s:1 + e]], dim=1)  # own CLS copy + own patches
        return emb[:, s:e]

    def encode(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Local non-CLS tokens h [B, t, D] -> the uint8 message: header + packed codes."""
        codes = self.quantizers[layer](h).reshape(-1, self.groups)
        head = torch.frombuffer(bytearray(HEADER.pack(_VERSION, self.bits, self.groups, codes.shape[0])), dtype=torch.uint8)
        return torch.cat([head, vq.pack_codes(codes, self.bits)])

    def decode_kv(self, msg: torch.Tensor, layer: int, B: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A peer's message -> its tokens' K^, V^ [B, t, D] (from our own codebook copy).

        Timed as VQ decode: unpacking and the table lookups, or unpacking and dequantizing; the
        direct path's K/V projection of h^ is attention compute (SP projects the same tokens).
        """
        got = HEADER.unpack(bytes(msg[:HEADER_BYTES].tolist()))
        if got != (_VERSION, self.bits, self.groups, B * t):
            raise CommError(f"rank {self.rank}: astra message header {got} != expected "
                            f"{(_VERSION, self.bits, self.groups, B * t)} (version, bits, groups, vectors)")
        with _Timer(self.vq_s, "decode"):
            codes = vq.unpack_codes(msg[HEADER_BYTES:], B * t, self.groups, self.bits)  # (B*t, G)
            if self.tables is not None:
                rows = codes + torch.arange(self.groups) * self.codebook_size  # rows of the [G*K, 2D] table
                kv = F.embedding_bag(rows, self.tables[layer], mode="sum")  # (B*t, 2*kv_dim): biases included
                w = self.cfg.kv_dim
                return kv[:, :w].reshape(B, t, -1), kv[:, w:].reshape(B, t, -1)
            h_hat = vq.dequantize(codes, self.codebooks[layer]).view(B, t, -1)
        attn = self.model.blocks[layer].attn
        return attn.k(h_hat), attn.v(h_hat)

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        x = self._local_embed(inp)  # (B, cls + t, D)
        B, c = x.shape[0], self.cls
        s, e = self.chunks[self.rank]
        mask = global_mask(self.model, s, e, self.tokens) if self.model.causal else None
        self.vq_s = dict.fromkeys(_VQ_KEYS, 0.0)
        for l, blk in enumerate(self.model.blocks):
            a = blk.attn
            h = blk.ln1(x)
            with _Timer(self.vq_s, "encode"):
                msg = self.encode(h[:, c:], l)
            got = self.comm.all_gather(msg)
            k_loc, v_loc = a.k(h), a.v(h)  # full precision, CLS copy included
            ks, vs = [k_loc[:, :c]], [v_loc[:, :c]]
            for r, (cs, ce) in enumerate(self.chunks):
                kv = (k_loc[:, c:], v_loc[:, c:]) if r == self.rank else self.decode_kv(got[r], l, B, ce - cs)
                ks.append(a.rotate(kv[0], torch.arange(cs, ce)))  # rotary models: at the sender's positions
                vs.append(kv[1])
            q = a.q(h) if c else a.rotate(a.q(h), torch.arange(s, e))  # a CLS copy only on ViT (no rotation)
            k_all, v_all = torch.cat(ks, 1), torch.cat(vs, 1)
            if self._keep_cache and self.rank == self.output_rank:  # local K/V and peers' K^/V^ (methods.decode)
                self._cache = (self._cache or []) + [[k_all, v_all]]
            x = x + a.o(a.mix(q, k_all, v_all, mask))
            x = x + blk.mlp(blk.ln2(x))
        return self._output(x)

    def _decode_step(self, ids, pos):
        """The last rank decodes alone from its mixed-precision cache (methods.decode): no codes per token."""
        return None if self.rank != self.output_rank else decode.step(self.model, self._cache, ids, pos)

    def _output(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.dct:
            cls = torch.stack(self.comm.all_gather(x[:, 0].contiguous())).mean(0)  # (B, D): N copies averaged
            return self.model.output(cls) if self.rank == self.output_rank else None
        if self.rank != self.output_rank:
            return None
        s, _ = self.chunks[self.rank]
        return self.model.output(x[:, self.model.output_index(self.tokens) - s])


def message_bytes(vectors: int, groups: int, bits: int) -> int:
    """Bytes of one block's message for ``vectors`` (B*t) token vectors: header + packed codes."""
    return HEADER_BYTES + packed_bytes(vectors * groups, bits)
