"""ASTRA's forward simulated in one process, differentiable, for fine-tuning (Liu et al., arXiv 2505.19342).

It computes what N devices running testbed.methods.astra compute, all at once, so that training
sees the inference method's semantics:

- tokens are split into N contiguous chunks (testbed.methods.base.token_chunks); a token's
  "owner" is the device holding it;
- in every block, h = LN1(x); a query attends to the keys/values of its own device's tokens in full
  precision and to every other device's tokens through their codes: K^ = h^ Wk, V^ = h^ Wv with
  h^ = codebook entries of the nearest codes (squared L2, per group);
- DCT on: every device prepends its own CLS copy to its chunk of patches; CLS copies are never
  quantized or seen by other devices; the N final CLS vectors are averaged before the head.
  DCT off: one CLS token, in device 0's chunk, quantized and seen by the others like any token.

All devices in one attention call: keys are [h of all tokens | h^ of all tokens] (2S keys) and
a boolean mask picks, per query, the full-precision keys of its own device and the quantized keys
of the others. Training-only pieces: the straight-through estimator (the forward uses h^, the
gradient flows to h), the commitment loss, codebook entries updated as moving averages of their
assigned tokens, and Noise-Augmented Quantization: Gaussian noise of std lambda * (per-group RMS
of the residual h^ - h, detached) added to h^.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from testbed.methods.base import token_chunks
from testbed.methods.vq import check_codebooks, dequantize, quantize
from testbed.models.layers import attend


def token_layout(T: int, world_size: int, dct: bool) -> tuple[list[int], torch.Tensor, torch.Tensor, list[int]]:
    """How the simulation orders tokens of a ViT input with T = 1 + patches tokens.

    Returns (source index into the model's [CLS, patches] embedding for each simulated token,
    owner device of each simulated token [S], quantized-and-shared flag [S], positions of the CLS
    copies whose final states form the output). DCT: S = T - 1 + N (one CLS copy per device).
    """
    if dct:
        src, owner, shared, cls_pos = [], [], [], []
        for r, (s, e) in enumerate(token_chunks(T - 1, world_size)):
            cls_pos.append(len(src))
            src += [0] + list(range(1 + s, 1 + e))  # this device's CLS copy, then its patches
            owner += [r] * (1 + e - s)
            shared += [False] + [True] * (e - s)
        return src, torch.tensor(owner), torch.tensor(shared), cls_pos
    owner = torch.empty(T, dtype=torch.long)
    for r, (s, e) in enumerate(token_chunks(T, world_size)):
        owner[s:e] = r
    return list(range(T)), owner, torch.ones(T, dtype=torch.bool), [0]


def key_mask(owner: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """bool [S, 2S]: query i sees full-precision key j iff same device, quantized key j iff another
    device's token that is shared (CLS copies under DCT are not)."""
    same = owner[:, None] == owner[None, :]  # (S, S)
    return torch.cat([same, ~same & shared[None, :]], dim=1)


class AstraSim(nn.Module):
    """A ViT with ASTRA VQ modules in place, on a copy of ``codebooks`` [L, G, K, D//G].

    Codebook entries follow the tokens assigned to them by exponential moving averages
    (VQ-VAE-2 style), updated in every training-mode forward when ``ema_decay`` is in (0, 1);
    ``ema_decay`` None keeps them fixed (evaluation). ``forward(images) -> logits [B, classes]``;
    after a forward, ``self.vq_losses`` holds (codebook loss ||h - e||^2 of the shared tokens, no
    gradient; commitment loss ||h - sg(e)||^2, gradient to the encoder), each summed over blocks.
    """

    def __init__(self, model, codebooks: torch.Tensor, world_size: int = 4, dct: bool = True,
                 naq_lambda: float = 0.0, seed: int = 0, ema_decay: float | None = None):
        super().__init__()
        check_codebooks(codebooks, model.cfg.n_layers, model.cfg.dim)
        self.model, self.world_size, self.dct, self.naq_lambda = model, world_size, dct, float(naq_lambda)
        self.ema_decay = ema_decay
        cb = codebooks.detach().clone().float()
        self.register_buffer("codebooks", cb)
        # EMA state: assignment counts [L, G, K] (a pseudo-count of 1 keeps unused entries in place)
        # and sums of the assigned vectors [L, G, K, d]; entry = sum / count
        self.register_buffer("ema_count", torch.ones(cb.shape[:3]))
        self.register_buffer("ema_sum", cb.clone())
        self.noise_gen = torch.Generator().manual_seed(seed)
        self.vq_losses: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def _ema_update(self, l: int, hs: torch.Tensor, codes: torch.Tensor) -> None:
        """Move block l's entries towards the mean of the shared tokens hs [n, D] assigned to them."""
        G, K, d = self.codebooks.shape[1:]
        flat = (codes.reshape(-1, G) + torch.arange(G) * K).reshape(-1)  # (n*G,): row in [G*K]
        counts = torch.bincount(flat, minlength=G * K).view(G, K).float()
        sums = torch.zeros(G * K, d).index_add_(0, flat, hs.reshape(-1, d)).view(G, K, d)
        g = self.ema_decay
        self.ema_count[l].mul_(g).add_(counts, alpha=1 - g)
        self.ema_sum[l].mul_(g).add_(sums, alpha=1 - g)
        self.codebooks[l] = self.ema_sum[l] / self.ema_count[l].unsqueeze(-1)

    def _quantized(self, h: torch.Tensor, l: int, shared: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(h^ for the keys/values of other devices, codebook loss, commitment loss) for block l."""
        cb = self.codebooks[l]  # (G, K, d)
        G, _, d = cb.shape
        with torch.no_grad():
            codes = quantize(h.detach(), cb)  # (B, S, G)
            e = dequantize(codes, cb)  # (B, S, D)
        hs, es = h[:, shared], e[:, shared]  # only tokens that are ever sent count in the losses
        cb_loss = F.mse_loss(es, hs.detach())
        commit = F.mse_loss(hs, es)
        h_hat = h + (e - h).detach()  # straight-through: value e, gradient to h
        if self.training and self.naq_lambda > 0:
            with torch.no_grad():
                r = (es - hs).reshape(-1, G, d)  # (n, G, d) residuals of the shared tokens
                sigma = r.pow(2).mean(dim=(0, 2)).sqrt().repeat_interleave(d)  # (D,): per-group RMS
                noise = torch.randn(h.shape, generator=self.noise_gen) * (self.naq_lambda * sigma)
            h_hat = h_hat + noise
        if self.training and self.ema_decay is not None:
            self._ema_update(l, hs.detach().reshape(-1, G * d), codes[:, shared])
        return h_hat, cb_loss, commit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        emb = m.embed(images)  # (B, T, D), [CLS, patches]
        src, owner, shared, cls_pos = token_layout(emb.shape[1], self.world_size, self.dct)
        x = emb[:, src]  # (B, S, D) simulated token order
        mask = key_mask(owner, shared)  # (S, 2S)
        cb_total = commit_total = x.new_zeros(())
        for l, block in enumerate(m.blocks):
            a = block.attn
            h = block.ln1(x)
            h_hat, cb_loss, commit = self._quantized(h, l, shared)
            kv_in = torch.cat([h, h_hat], dim=1)  # (B, 2S, D): [full precision | quantized]
            x = x + a.o(attend(a.q(h), a.k(kv_in), a.v(kv_in), a.head_dim, mask))
            x = x + block.mlp(block.ln2(x))
            cb_total, commit_total = cb_total + cb_loss, commit_total + commit
        self.vq_losses = (cb_total, commit_total)
        return m.output(x[:, cls_pos].mean(dim=1))  # DCT: average of the N CLS copies; else the one CLS
