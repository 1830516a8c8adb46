"""Pre-LN Transformer block, shared by ViT and GPT-2.

Parameters are kept as separate q/k/v/o and fc1/fc2 Linear layers (weight [out, in]) so that
methods can shard them by rows/columns and compute K/V for tokens they did not embed
themselves. The loader maps HF checkpoint keys onto these names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from testbed.models.config import ModelConfig


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on already-projected q [B, Tq, h*hd], k, v [B, Tk, h*hd].

    ``mask``: bool [Tq, Tk], True where a query may attend. The number of heads is taken
    from the width, so a rank holding a subset of heads calls this unchanged.
    """
    B, Tq, W = q.shape
    Tk, h = k.shape[1], W // head_dim
    q = q.view(B, Tq, h, head_dim).transpose(1, 2)  # (B, h, Tq, hd)
    k = k.view(B, Tk, h, head_dim).transpose(1, 2)  # (B, h, Tk, hd)
    v = v.view(B, Tk, h, head_dim).transpose(1, 2)  # (B, h, Tk, hd)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, Tq, hd)
    return y.transpose(1, 2).reshape(B, Tq, W)


def attend_reference(q, k, v, head_dim, mask=None):
    """The plain softmax(QK^T/sqrt(d))V path, kept beside the fused one for tests."""
    B, Tq, W = q.shape
    Tk, h = k.shape[1], W // head_dim
    q = q.view(B, Tq, h, head_dim).transpose(1, 2)
    k = k.view(B, Tk, h, head_dim).transpose(1, 2)
    v = v.view(B, Tk, h, head_dim).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (B, h, Tq, Tk)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return (att.softmax(-1) @ v).transpose(1, 2).reshape(B, Tq, W)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """bool [Tq, Tk]: query at global position i sees keys at positions <= i."""
    return q_pos[:, None] >= k_pos[None, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.dim
        self.head_dim = cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def rotate(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """q or k at global positions ``pos``: unchanged here (positions are in the embeddings; see llama.py)."""
        return t

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of all heads (already projected), before the output projection."""
        return attend(q, k, v, self.head_dim, mask)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.o(attend(self.q(h), self.k(h), self.v(h), self.head_dim, mask))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        # GPT-2 uses the tanh approximation ("gelu_new"); ViT the exact erf GELU
        self.approximate = "tanh" if cfg.kind == "gpt2" else "none"

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x + Attn(LN1(x)), then + MLP(LN2(.)). Methods reuse ln1/attn/ln2/mlp piece by piece."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


def init_weights(module: nn.Module) -> None:
    """GPT-2 style: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
