"""Vector quantization for ASTRA (Liu et al., arXiv 2505.19342, Sec. 3): codebooks, nearest-code
search, bit packing, k-means fitting of codebooks and codebook files.

Codebook layout (the contract with testbed.train): float32 ``[L, G, K, D//G]``: for every
block l and group g, K entries of width D/G. A codebook shared by all groups is stored as G
identical copies, so readers never special-case it.

Codes travel as ``b = ceil(log2 K)`` bits each, least significant bit first, packed into a
uint8 tensor (never int64 on the wire).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from testbed.errors import ConfigError, check

# nearest-code search works in slices so that the [G, n, K] distance tensor stays <= this many floats
_MAX_DIST_ELEMS = 1 << 18  # distance slices of 1 MiB stay in cache: 4x faster than 32 MiB at G=32

# The fast search: a first pass in int8 (each token vector and each codebook entry scaled to
# [-127, 127] by its own max |value| and rounded; products summed exactly in int32 by torch._int_mm,
# VNNI on x86: 4.6x the fp32 matmul's speed), then the RERANK entries it ranks nearest are compared
# exactly in fp32 and the nearest of those is the code. It differs from the exhaustive search only
# where the true nearest entry is not among the int8 pass's RERANK nearest: a near tie, whose
# entries are then nearly equally far. A worst-case bound would not help: rounding moves a
# distance by up to |x||c| sqrt(d)/127, which leaves most ViT-Base tokens with several candidates,
# while the actual error is a small fraction of it. Measured instead (vit-base, random init,
# k-means codebooks, G=1, K=1024, 1024 tokens, all 12 blocks): RERANK=2 picked the exact code for
# 99.9% of the tokens of the worst block, RERANK=4 for 100% of every block. SEARCH_AGREEMENT is
# the floor tests/methods/test_vq.py asserts on real activations of small models.
RERANK = 4
SEARCH_AGREEMENT = 0.99
# narrow groups (D/G < 64, e.g. G=32 on ViT-Base) gain little and pay a top-k per group and token;
# small codebooks are searched exhaustively faster than the int8 pass's extra steps (K=16: 3x)
_FAST_MIN_WIDTH = 64
_FAST_MIN_ENTRIES = 256


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [n, d] as int8 and their scales [n, 1]: x ~ q * scale, |q| <= 127."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


def code_bits(codebook_size: int) -> int:
    """b = ceil(log2 K) bits per code (K >= 2)."""
    check(isinstance(codebook_size, int) and codebook_size >= 2, "codebook_size", codebook_size, "an integer >= 2")
    return max(1, math.ceil(math.log2(codebook_size)))


class Quantizer:
    """Nearest-entry search for one block's codebook [G, K, D//G], with the codebook prepared once
    (transposed and scaled by -2, squared norms) so that each call is one batched matmul + min.

    ||h - c||^2 = ||h||^2 - 2 h.c + ||c||^2; ||h||^2 is the same for every c, so the code is
    argmin(||c||^2 - 2 h.c), computed with baddbmm over [G, n, K] slices, not cdist over [G, n, K, d].

    ``exact``: False (the default) uses the fast search (int8 first pass, exact re-ranking of its
    RERANK nearest; see SEARCH_AGREEMENT) where it pays (D/G >= 64 and K >= 256); True always
    searches exhaustively in fp32 (k-means does, so that codebook fits stay exactly Lloyd's).
    """

    def __init__(self, codebook: torch.Tensor, exact: bool = False):
        check(codebook.dim() == 3, "codebook", tuple(codebook.shape), "a [G, K, D//G] tensor")
        self.codebook = codebook
        self.G, self.K, self.d = codebook.shape
        self._ct = (-2.0 * codebook.transpose(1, 2)).contiguous()  # (G, d, K)
        self._cn = (codebook * codebook).sum(-1).unsqueeze(1)  # (G, 1, K)
        self.fast = (not exact and self.K >= _FAST_MIN_ENTRIES and self.d >= _FAST_MIN_WIDTH
                     and codebook.dtype == torch.float32)
        self._scratch: torch.Tensor | None = None
        if self.fast:
            q, scale = zip(*(_int8_rows(c) for c in codebook))  # per group: [K, d] int8, [K, 1]
            self._cq = [x.T.contiguous() for x in q]  # (d, K) int8 per group
            self._cs = [(-2.0 * sc.T).contiguous() for sc in scale]  # (1, K): -2 * entry scale

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x [G, n, d] -> int64 [G, n]: index of the nearest entry of each group's codebook."""
        n = x.shape[1]
        step = max(1, _MAX_DIST_ELEMS // max(1, self.G * self.K))
        out = torch.empty(self.G, n, dtype=torch.int64)
        for s in range(0, n, step):
            xs = x[:, s:s + step]
            if self.fast:
                for g in range(self.G):
                    out[g, s:s + step] = self._fast_group(xs[g], g)
                continue
            dist = torch.baddbmm(self._cn, xs, self._ct)  # (G, n_s, K)
            out[:, s:s + step] = dist.min(-1).indices  # min(dim) is faster than argmin on CPU; first on ties
        return out

    def _fast_group(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Codes of x [n, d] in group g: int8 distances, then the exactly nearest of their RERANK nearest."""
        xq, xs = _int8_rows(x)
        dot = torch._int_mm(xq, self._cq[g])  # (n, K) int32: exact sums of the rounded products
        approx = torch.addcmul(self._cn[g], dot.float(), xs * self._cs[g])  # ||c||^2 - 2 x.c, roughly
        cand = approx.topk(RERANK, dim=-1, largest=False, sorted=False).indices  # (n, R)
        picked = self._buffer(cand.numel())
        torch.index_select(self.codebook[g], 0, cand.reshape(-1), out=picked)
        dots = picked.view(-1, RERANK, self.d).mul_(x.unsqueeze(1)).sum(-1)  # (n, R) exact x.c, in fp32
        exact = self._cn[g, 0][cand] - 2.0 * dots
        return cand.gather(1, exact.argmin(-1, keepdim=True))[:, 0]

    def _buffer(self, rows: int) -> torch.Tensor:
        """[rows, d] scratch for the re-ranked entries, kept between calls: a fresh multi-MB tensor
        per call costs more in page faults (under inference_mode: 2.7 ms) than the re-ranking itself."""
        if self._scratch is None or self._scratch.shape[0] < rows:
            with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
                self._scratch = torch.empty(rows, self.d)
        return self._scratch[:rows]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Codes of h [..., D] -> int64 [..., G]."""
        G, d = self.G, self.d
        check(h.shape[-1] == G * d, "h", tuple(h.shape), f"last dim = groups * group width = {G * d}")
        x = h.reshape(-1, G, d).transpose(0, 1).to(self.codebook.dtype)  # (G, n, d)
        return self.nearest(x).transpose(0, 1).reshape(*h.shape[:-1], G)


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest entry by squared L2 (exhaustive) for points x [G, n, d] and codebooks c [G, K, d] -> int64 [G, n]."""
    return Quantizer(c, exact=True).nearest(x)


def quantize(h: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codes of h [..., D] with one block's codebook [G, K, D//G] -> int64 [..., G], by the exhaustive
    search (training's forward: its codes, and so its straight-through gradients, are exactly the
    nearest entries, as k-means' are).

    Calls with the same codebook again and again (ASTRA, every inference) should keep a
    ``Quantizer(codebook)`` instead (the fast search where it pays).
    """
    return Quantizer(codebook, exact=True)(h)


def dequantize(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codebook entries for codes [..., G] -> h_hat [..., D] (groups concatenated in order)."""
    G, K, d = codebook.shape
    lead = codes.shape[:-1]
    flat = codes.reshape(-1, G).long()  # (n, G)
    picked = codebook[torch.arange(G), flat]  # (n, G, d)
    return picked.reshape(*lead, G * d)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack integer codes [n, G] (each < 2**bits) -> uint8 [ceil(n*G*bits/8)], LSB first."""
    check(1 <= bits <= 31, "bits", bits, "1..31")
    flat = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # code i's bit j at position i*bits + j
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (stream.view(-1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_codes(buf: torch.Tensor, n: int, groups: int, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 buffer -> int64 codes [n, groups]."""
    need = math.ceil(n * groups * bits / 8)
    check(buf.dtype == torch.uint8 and buf.numel() >= need, "buf", (buf.dtype, buf.numel()),
          f"a uint8 tensor of at least {need} bytes")
    stream = ((buf[:need].to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    stream = stream[: n * groups * bits].view(n * groups, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1).view(n, groups)


# -- k-means ------------------------------------------------------------------------------
def _pad_small(x: torch.Tensor, K: int, gen: torch.Generator) -> torch.Tensor:
    """n < K points: every point is an entry; the rest repeat points with a small seeded jitter
    (distinct entries, so that training can pull them apart)."""
    n = x.shape[0]
    extra = x[torch.arange(K - n) % n]
    scale = 1e-3 * (float(x.std()) if n > 1 else 1.0) + 1e-12
    return torch.cat([x, extra + scale * torch.randn(extra.shape, generator=gen, dtype=x.dtype)])


def _kmeans_pp(x: torch.Tensor, K: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding of [G, K, d] centres from x [G, n, d], all groups at once (seeded).

    Batched over groups because the K sequential picks are a Python loop (per group it was L*G*K
    steps: 365 s for ViT-Base at G=32, K=1024). Each step is one batched mat-vec (no [G, n, d]
    temporaries) and an inverse-CDF draw (faster than torch.multinomial here).
    """
    G, n, d = x.shape
    rows = torch.arange(G)
    xn = (x * x).sum(-1)  # (G, n)

    def dist_to(centre: torch.Tensor) -> torch.Tensor:  # (G, d) -> squared distances (G, n)
        return torch.baddbmm((xn + (centre * centre).sum(-1, keepdim=True))[:, :, None], x, centre[:, :, None],
                             alpha=-2.0)[:, :, 0]

    centres = torch.empty(G, K, d, dtype=x.dtype)
    centres[:, 0] = x[rows, torch.randint(n, (G,), generator=gen)]
    mind = dist_to(centres[:, 0])  # (G, n): squared distance to the nearest chosen centre
    for k in range(1, K):
        cdf = (mind.clamp_min(0) + 1e-30).cumsum(-1)  # all-identical points: a uniform pick
        u = torch.rand(G, 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u)[:, 0].clamp_max(n - 1)  # (G,)
        centres[:, k] = x[rows, pick]
        torch.minimum(mind, dist_to(centres[:, k]), out=mind)
    return centres


def kmeans_groups(x: torch.Tensor, K: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """K centres per group [G, K, d] of points x [G, n, d]: k-means++ seeding then Lloyd
    iterations (squared L2), every group in the same tensor ops.

    Deterministic for a given seed. With n < K every point becomes an entry and the remaining
    entries repeat points with a small seeded jitter (1e-3 std). Empty clusters keep their previous centre.
    """
    check(isinstance(K, int) and K >= 2, "codebook_size", K, "an integer >= 2")
    check(x.dim() == 3 and x.shape[1] >= 1, "x", tuple(x.shape), "a non-empty [G, n, d] tensor")
    x = x.detach().float().contiguous()
    G, n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    if n <= K:
        return torch.stack([_pad_small(xg, K, gen) if n < K else xg.clone() for xg in x])
    c = _kmeans_pp(x, K, gen)
    offsets = (torch.arange(G) * K)[:, None]  # flat index of (group, entry)
    assign = None
    for _ in range(iters):
        new = _nearest(x, c)  # (G, n)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        flat = (assign + offsets).reshape(-1)
        sums = torch.zeros(G * K, d).index_add_(0, flat, x.reshape(-1, d)).view(G, K, d)
        counts = torch.bincount(flat, minlength=G * K).to(x.dtype).view(G, K, 1)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c


def kmeans(x: torch.Tensor, K: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """K centres [K, d] of points x [n, d] (kmeans_groups with one group)."""
    check(x.dim() == 2 and x.shape[0] >= 1, "x", tuple(x.shape), "a non-empty [n, d] tensor")
    return kmeans_groups(x[None], K, iters=iters, seed=seed)[0]


# -- codebooks from a model ----------------------------------------------------------------
@torch.inference_mode()
def block_inputs(model, inp: torch.Tensor) -> list[torch.Tensor]:
    """The LN1 outputs h = LN1(x) of every block of a single-device forward: L tensors [B, T, D].

    Runs the blocks by hand rather than with forward hooks: ranks in one process share the model,
    and a hook would also fire for the other ranks' forwards.
    """
    from testbed.models.layers import causal_mask

    x = model.embed(inp)
    T = x.shape[1]
    mask = causal_mask(torch.arange(T), torch.arange(T)) if model.causal else None
    seen = []
    for block in model.blocks:
        seen.append(block.ln1(x))
        x = block(x, mask)
    return seen


def _check_groups(model, groups: int) -> int:
    D = model.cfg.dim
    check(isinstance(groups, int) and groups >= 1 and D % groups == 0, "groups", groups,
          f"a positive divisor of the model's hidden size D={D}")
    return D // groups


def fit_codebooks(model, groups: int, codebook_size: int, tokens: int, seed: int = 0,
                  n_samples: int = 2, iters: int = 20) -> torch.Tensor:
    """k-means codebooks [L, G, K, D//G] fit to the LN1 outputs of ``n_samples`` seeded inputs
    (ASTRA's ``calibration_samples`` param).

    Fitting inputs are ``model.make_input(tokens, seed=1_000_003 + seed + i)``: seeds away from
    the small seeds used for evaluation inputs, so the fit never sees the evaluated input.
    ViT's CLS token is left out (ASTRA never quantizes it: Distributed Class Tokens).
    Cost: L*G k-means runs over n_samples*tokens points; deterministic for a given seed.
    """
    d = _check_groups(model, groups)
    code_bits(codebook_size)
    check(isinstance(n_samples, int) and n_samples >= 1, "n_samples", n_samples, "an integer >= 1")
    skip = 1 if model.cfg.kind == "vit" else 0
    per_block: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    for i in range(n_samples):
        inp = model.make_input(tokens, batch=1, seed=1_000_003 + seed + i)
        for l, h in enumerate(block_inputs(model, inp)):
            per_block[l].append(h[:, skip:].reshape(-1, model.cfg.dim))
    out = torch.empty(len(model.blocks), groups, codebook_size, d)
    for l, hs in enumerate(per_block):
        h = torch.cat(hs).view(-1, groups, d).transpose(0, 1)  # (G, n, d)
        out[l] = kmeans_groups(h, codebook_size, iters=iters, seed=seed * 7919 + l * 131)
    return out


def exact_codebooks(model, inp: torch.Tensor, groups: int) -> torch.Tensor:
    """Codebooks [L, G, K, D//G] holding exactly the LN1 outputs of ``inp``'s tokens at every block.

    K is the next power of two >= B*T (every token is an entry; the rest repeat the first entry),
    so quantizing this input is lossless: ASTRA with these codebooks must reproduce single.
    """
    d = _check_groups(model, groups)
    hs = block_inputs(model, inp)
    n = hs[0].shape[0] * hs[0].shape[1]
    K = max(2, 1 << (n - 1).bit_length())
    out = torch.empty(len(hs), groups, K, d)
    for l, h in enumerate(hs):
        x = h.reshape(n, groups, d).transpose(0, 1)  # (G, n, d)
        out[l, :, :n] = x
        out[l, :, n:] = x[:, :1]
    return out


def check_codebooks(codebooks: torch.Tensor, n_layers: int, dim: int, field: str = "codebooks") -> None:
    """Raise ConfigError unless codebooks is float [L, G, K, D//G] for this model."""
    ok = (isinstance(codebooks, torch.Tensor) and codebooks.dim() == 4 and codebooks.shape[0] == n_layers
          and codebooks.shape[1] * codebooks.shape[3] == dim and codebooks.shape[2] >= 2
          and codebooks.is_floating_point())
    if not ok:
        shape = tuple(codebooks.shape) if isinstance(codebooks, torch.Tensor) else type(codebooks).__name__
        raise ConfigError(field, shape, f"a float tensor [L={n_layers}, G, K>=2, D//G] with G*(D//G) = {dim}")


def save_codebooks(path: str | Path, codebooks: torch.Tensor, meta: dict[str, Any] | None = None) -> None:
    """Write codebooks [L, G, K, D//G] and a JSON-able ``meta`` dict with torch.save."""
    check(isinstance(codebooks, torch.Tensor) and codebooks.dim() == 4, "codebooks",
          getattr(codebooks, "shape", codebooks), "a [L, G, K, D//G] tensor")
    torch.save({"format": "testbed-codebooks-v1", "codebooks": codebooks.detach().float().contiguous(),
                "meta": dict(meta or {})}, str(path))


def load_codebooks(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a file written by save_codebooks -> (codebooks [L, G, K, D//G] float32, meta)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("codebook_path", str(path), "an existing file written by save_codebooks")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError("codebook_path", str(path), f"a file written by save_codebooks ({e})") from None
    if not (isinstance(obj, dict) and obj.get("format") == "testbed-codebooks-v1"):
        raise ConfigError("codebook_path", str(path), "a file written by save_codebooks (format testbed-codebooks-v1)")
    return obj["codebooks"].float(), dict(obj.get("meta") or {})
