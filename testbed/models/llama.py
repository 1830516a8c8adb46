"""Llama-family decoder (Llama 2/3, Qwen2, SmolLM) in plain PyTorch, beside ViT and GPT-2.

Pre-norm blocks with RMSNorm, rotary position embeddings (RoPE, HF's rotate-half layout, with the
``rope_theta`` and ``rope_scaling`` fields HF configs carry: linear and llama3), grouped-query
attention (n_kv_heads KV heads, each shared by n_heads / n_kv_heads query heads; 1 is multi-query)
and a SwiGLU MLP (down(silu(gate(x)) * up(x))). Token embeddings tied to the head or not.

The block keeps the pieces methods reuse on every model: ``ln1``, ``attn.q/k/v/o`` (Linear,
weight [out, in]; K and V are kv_dim wide), ``ln2``, ``mlp``. Positions are not added to the
embeddings: attention rotates q and k at their global positions (``attn.rotate(t, pos)``), so a rank
computing K for tokens it did not embed rotates them at the senders' true positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from testbed.errors import check
from testbed.models.config import ModelConfig
from testbed.models.layers import causal_mask


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as HF does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] of the rotary embedding, with HF's ``rope_scaling`` applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = dict(cfg.rope_scaling)
    kind = s.get("rope_type")
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":  # transformers' _compute_llama3_parameters
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def apply_rope(t: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotate t [B, n, h*hd] (any number of heads) token by token at global positions ``pos`` [n]."""
    B, n, W = t.shape
    ang = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # (n, hd/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # (n, hd)
    x = t.view(B, n, W // head_dim, head_dim)  # (B, n, h, hd)
    x1, x2 = x[..., :head_dim // 2], x[..., head_dim // 2:]
    rot = torch.cat([-x2, x1], -1)
    return (x * cos[:, None] + rot * sin[:, None]).reshape(B, n, W)


def gqa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, kv_index: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, Tq, h*hd] over k, v [B, Tk, hkv*hd]; query head i reads KV head kv_index[i].

    ``mask``: bool [Tq, Tk], True where a query may attend. A rank holding a subset of the heads
    passes its own (local) kv_index.
    """
    B, Tq, W = q.shape
    Tk, h = k.shape[1], W // head_dim
    q = q.view(B, Tq, h, head_dim).transpose(1, 2)  # (B, h, Tq, hd)
    k = k.view(B, Tk, -1, head_dim)[:, :, kv_index].transpose(1, 2)  # (B, h, Tk, hd)
    v = v.view(B, Tk, -1, head_dim)[:, :, kv_index].transpose(1, 2)  # (B, h, Tk, hd)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, Tq, hd)
    return y.transpose(1, 2).reshape(B, Tq, W)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, kv = cfg.dim, cfg.kv_dim
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(D, D, bias=cfg.qkv_bias)
        self.k = nn.Linear(D, kv, bias=cfg.qkv_bias)
        self.v = nn.Linear(D, kv, bias=cfg.qkv_bias)
        self.o = nn.Linear(D, D, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.register_buffer("kv_index", torch.arange(cfg.n_heads) // (cfg.n_heads // cfg.kv_heads), persistent=False)

    def rotate(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """q or k [B, n, h*hd] rotated at global positions ``pos`` [n]."""
        return apply_rope(t, pos, self.inv_freq, self.head_dim)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of all heads (already projected and rotated), before the output projection."""
        return gqa_attend(q, k, v, self.head_dim, self.kv_index, mask)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(h.shape[1]) if pos is None else pos
        return self.o(self.mix(self.rotate(self.q(h), pos), self.rotate(self.k(h), pos), self.v(h), mask))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    """x + Attn(RMSNorm1(x), pos), then + SwiGLU(RMSNorm2(.)). ``pos`` defaults to 0..T-1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = RMSNorm(cfg.dim, cfg.ln_eps)
        self.attn = LlamaAttention(cfg)
        self.ln2 = RMSNorm(cfg.dim, cfg.ln_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask, pos)
        return x + self.mlp(self.ln2(x))


class Llama(nn.Module):
    """A Llama-family causal LM; the output is the next-token logits of the last prompt token.

    Same four pieces as ViT and GPT-2 (``embed``, ``blocks``, ``output``, ``output_index``) plus
    ``embed_positions(ids, start)`` (here positions only matter inside attention).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.ln_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @property
    def causal(self) -> bool:
        return True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, T, D)
        T = x.shape[1]
        pos = torch.arange(T)
        mask = causal_mask(pos, pos)
        for block in self.blocks:
            x = block(x, mask, pos)
        return self.output(x[:, self.output_index(T)])

    def embed_positions(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of ``ids`` [B, t] at positions start..: the token embedding (RoPE acts in attention)."""
        return self.wte(ids)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        check(ids.shape[1] <= self.cfg.max_positions, "tokens", ids.shape[1], f"<= max_positions={self.cfg.max_positions}")
        return self.wte(ids)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return h @ self.wte.weight.T if self.lm_head is None else self.lm_head(h)

    def output_index(self, T: int) -> int:
        return self.cfg.output_index(T)

    def make_input(self, tokens: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Random token ids [B, tokens]."""
        check(isinstance(tokens, int) and 1 <= tokens <= self.cfg.max_positions, "tokens", tokens,
              f"an integer in [1, {self.cfg.max_positions}] for this model")
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.cfg.vocab_size, (batch, tokens), generator=gen)


def init_llama(model: Llama) -> None:
    """N(0, 0.02) weights, zero biases, unit RMSNorm weights (HF's initializer_range default)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
