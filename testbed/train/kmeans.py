"""k-means for G codebooks at once: the initialisation of ASTRA's per-group codebooks.

testbed.methods.vq.kmeans solves one codebook at a time; the k-means++ seeding is a Python loop
of K steps, so G=32 groups x 4 blocks x K=1024 is 131k sequential steps (minutes on 2 shared
cores). Here the G problems of one block advance together: the same algorithm (k-means++
seeding, then Lloyd iterations with vq's nearest-code search, empty clusters keep their centre),
batched over the group axis, so the loop is K steps per block whatever G is.
"""

from __future__ import annotations

import torch

from testbed.errors import check
from testbed.methods.vq import Quantizer  # the one nearest-code search (batched matmul)

# Distance slices of at most this many floats (1 MiB) stay in cache: at G=32, K=1024 nearest()
# ran 4x faster than with vq's 32 MiB slices on this host (0.29 s vs 1.17 s for 4352 tokens).
_SLICE_ELEMS = 1 << 18


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre (squared L2) for x [G, n, d] and centres c [G, K, d] -> int64 [G, n].

    vq's Quantizer, called on cache-sized slices of the points; the result is the same.
    """
    G, n, _ = x.shape
    q = Quantizer(c)
    step = max(1, _SLICE_ELEMS // (G * c.shape[1]))
    return torch.cat([q.nearest(x[:, s:s + step]) for s in range(0, n, step)], dim=1)


def quantize(h: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codes int64 [..., G] of h [..., D] with one block's codebook [G, K, D//G] (as vq.quantize)."""
    G, _, d = codebook.shape
    lead = h.shape[:-1]
    x = h.reshape(-1, G, d).transpose(0, 1).contiguous()  # (G, n, d)
    return nearest(x, codebook).transpose(0, 1).reshape(*lead, G)


def _seed_pp(x: torch.Tensor, K: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ centres [G, K, d] for points x [G, n, d], every group seeded independently."""
    G, n, d = x.shape
    rows = torch.arange(G)
    xn = (x * x).sum(-1)  # (G, n)
    c = torch.empty(G, K, d, dtype=x.dtype)

    def dist_to(centre: torch.Tensor) -> torch.Tensor:  # centre (G, d) -> squared distances (G, n)
        # ||x||^2 - 2 x.c + ||c||^2 as one batched mat-vec: no [G, n, d] temporaries per step
        return torch.baddbmm((xn + (centre * centre).sum(-1, keepdim=True))[:, :, None], x, centre[:, :, None],
                             alpha=-2.0)[:, :, 0]

    c[:, 0] = x[rows, torch.randint(n, (G,), generator=gen)]
    mind = dist_to(c[:, 0])  # (G, n): squared distance to the nearest chosen centre
    for k in range(1, K):
        # sample a point with probability ~ mind (inverse CDF: 4x faster than torch.multinomial here)
        cdf = (mind.clamp_min(0) + 1e-30).cumsum(-1)  # (G, n)
        u = torch.rand(G, 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u)[:, 0].clamp_max(n - 1)  # (G,)
        c[:, k] = x[rows, pick]
        torch.minimum(mind, dist_to(c[:, k]), out=mind)
    return c


def kmeans_groups(x: torch.Tensor, K: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Centres [G, K, d] of G independent point sets x [G, n, d] (squared L2), deterministic per seed.

    Needs n >= K (ASTRA's calibration samples thousands of tokens per block).
    """
    check(isinstance(K, int) and K >= 2, "codebook_size", K, "an integer >= 2")
    check(x.dim() == 3 and x.shape[1] >= K, "kmeans_tokens", x.shape[1] if x.dim() == 3 else tuple(x.shape),
          f"at least codebook_size={K} calibration tokens")
    x = x.detach().float().contiguous()
    G, n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    c = _seed_pp(x, K, gen)
    offset = (torch.arange(G) * K)[:, None]  # (G, 1): flat index of group g's first centre
    assign = None
    for _ in range(iters):
        new = nearest(x, c)  # (G, n)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        flat = (assign + offset).reshape(-1)
        sums = torch.zeros(G * K, d).index_add_(0, flat, x.reshape(-1, d))
        counts = torch.bincount(flat, minlength=G * K).to(x.dtype)[:, None]
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c.reshape(G * K, d)).view(G, K, d)
    return c
