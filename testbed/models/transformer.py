"""ViT and GPT-2 as plain PyTorch modules with one shared shape (Llama, in llama.py, has it too).

Every model exposes the same four pieces, which is all a parallel method needs:
``embed(inp) -> x [B, T, D]``, ``blocks`` (pre-LN Blocks), ``output(h [B, D]) -> logits``
and ``output_index(T)`` (the token whose final hidden state gives the output: CLS for ViT,
the last prompt token for GPT-2). ``forward`` composes them; it is the single-device reference.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from testbed.errors import check
from testbed.models.config import ModelConfig
from testbed.models.layers import Block, causal_mask, init_weights
from testbed.models.llama import Llama, init_llama


class TransformerModel(nn.Module):
    cfg: ModelConfig

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)

    @property
    def causal(self) -> bool:
        return self.cfg.causal

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.embed(inp)  # (B, T, D)
        T = x.shape[1]
        mask = causal_mask(torch.arange(T), torch.arange(T)) if self.causal else None
        for block in self.blocks:
            x = block(x, mask)
        return self.output(x[:, self.output_index(T)])

    # implemented by ViT / GPT2
    def embed(self, inp: torch.Tensor) -> torch.Tensor: ...
    def output(self, h: torch.Tensor) -> torch.Tensor: ...
    def output_index(self, T: int) -> int: ...
    def make_input(self, tokens: int, batch: int = 1, seed: int = 0) -> torch.Tensor: ...


def patch_grid(n_patches: int) -> tuple[int, int]:
    """The most square (rows, cols) grid with exactly n_patches cells, rows <= cols."""
    rows = int(math.isqrt(n_patches))
    while n_patches % rows:
        rows -= 1
    return rows, n_patches // rows


class ViT(TransformerModel):
    """Vision Transformer (google/vit-base-patch16-224 layout). Any image size whose sides are
    multiples of the patch size works: position embeddings are interpolated to the grid, so the
    token count (patches + CLS) can be 197, 1024 or more."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        g = cfg.image_size // cfg.patch_size
        self.patch = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.zeros(1, 1 + g * g, cfg.dim))
        self.classifier = nn.Linear(cfg.dim, cfg.n_classes)

    def pos_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """[1, 1 + rows*cols, D]: the trained grid, bicubically resized when the grid differs."""
        g = self.cfg.image_size // self.cfg.patch_size
        if (rows, cols) == (g, g):
            return self.pos
        grid = self.pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([self.pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with position embeddings, without CLS: [B, rows*cols, D]."""
        x = self.patch(images)  # (B, D, rows, cols)
        rows, cols = x.shape[-2:]
        return x.flatten(2).transpose(1, 2) + self.pos_embedding(rows, cols)[:, 1:]

    def cls_embedding(self) -> torch.Tensor:
        """The CLS token with its position embedding: [1, 1, D]."""
        return self.cls_token + self.pos[:, :1]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed_patches(images)
        return torch.cat([self.cls_embedding().expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+P, D)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(h))

    def output_index(self, T: int) -> int:
        return self.cfg.output_index(T)

    def make_input(self, tokens: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Random images [B, C, H, W] sized to give exactly ``tokens`` tokens (patches + CLS)."""
        check(isinstance(tokens, int) and tokens >= 2, "tokens", tokens, "an integer >= 2 for ViT (patches + CLS)")
        rows, cols = patch_grid(tokens - 1)
        p = self.cfg.patch_size
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.cfg.channels, rows * p, cols * p, generator=gen)


class GPT2(TransformerModel):
    """GPT-2 causal LM (HF `gpt2` layout); the output is the next-token logits of the last prompt token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.dim)

    def embed_positions(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of ``ids`` [B, t] placed at global positions start..start+t-1."""
        pos = torch.arange(start, start + ids.shape[1])
        return self.wte(ids) + self.wpe(pos)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        check(ids.shape[1] <= self.cfg.max_positions, "tokens", ids.shape[1], f"<= max_positions={self.cfg.max_positions}")
        return self.embed_positions(ids, 0)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) @ self.wte.weight.T  # lm_head tied to wte, as in GPT-2

    def output_index(self, T: int) -> int:
        return self.cfg.output_index(T)

    def make_input(self, tokens: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Random token ids [B, tokens]."""
        check(isinstance(tokens, int) and 1 <= tokens <= self.cfg.max_positions, "tokens", tokens,
              f"an integer in [1, {self.cfg.max_positions}] for this GPT-2")
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.cfg.vocab_size, (batch, tokens), generator=gen)


# nn.init draws from torch's process-wide generator: in-process ranks building their models in
# threads at the same time would interleave draws and get different weights.
_INIT_LOCK = threading.Lock()


def new_model(cfg: ModelConfig, seed: int = 0) -> TransformerModel:
    """A model with deterministic random weights: the same seed gives the same weights in every
    process and every thread."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.kind == "llama":
            model = Llama(cfg)
            init_llama(model)
            return model.eval()
        model = (ViT if cfg.kind == "vit" else GPT2)(cfg)
        init_weights(model)
        if isinstance(model, ViT):
            nn.init.normal_(model.cls_token, std=0.02)
            nn.init.normal_(model.pos, std=0.02)
    return model.eval()
