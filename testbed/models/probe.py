"""How fast this host computes right now: the CPU time of one fixed transformer block.

A compute profile is measured once and used for runs made hours later, but a shared host's
speed drifts (other tenants' caches and memory traffic, frequency): on the VM the references
were made on, the same forward pass took up to 20% longer within an hour. ``host_probe_s``
times one pre-LN encoder block (ViT-S sized: 197 tokens, 384 wide, 6 heads, MLP 1536, fixed
weights) on one thread of the calling process, in that thread's CPU seconds, so that a run and
a calibration can each record how fast the host was when they measured; their ratio carries a
calibration made at one time over to a run made at another.

CPU time, not wall time: what a time-dilated device is metered in (its CFS quota), and what a
calibration records; work by other processes on the host does not enter it, their effect on
this core's speed does.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from testbed.errors import check

#: the probe's shape (tokens, width, heads, MLP width): one block of vit-small at 224 px
PROBE_SHAPE = (197, 384, 6, 1536)
#: timed runs of the block (the median is reported) after one untimed one: single runs spread ±15% on
#: a shared VM from one second to the next; the median of 15 (about 0.2 s) still follows the host's
#: slower and faster phases (9.1-13.1 ms across the units of one run on the reference VM)
PROBE_RUNS = 15


def _block_weights(dim: int, mlp: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    return {"qkv": w(3 * dim, dim), "proj": w(dim, dim), "fc1": w(mlp, dim), "fc2": w(dim, mlp)}


def _block(x: torch.Tensor, p: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    t, d = x.shape
    q, k, v = F.linear(F.layer_norm(x, (d,)), p["qkv"]).view(t, 3, heads, d // heads).permute(1, 2, 0, 3)
    x = x + F.linear(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(t, d), p["proj"])
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,)), p["fc1"])), p["fc2"])


def probe_block() -> Callable[[], torch.Tensor]:
    """The probe's block with its fixed weights and input, ready to run (call it under
    ``torch.inference_mode()``, at the torch thread count to be measured)."""
    tokens, dim, heads, mlp = PROBE_SHAPE
    p = _block_weights(dim, mlp)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1))
    return lambda: _block(x, p, heads)


def host_probe_s(runs: int = PROBE_RUNS) -> float:
    """Median CPU seconds of the calling thread for one probe block at one torch thread (about
    12 ms on the reference VM's cores). The process's torch thread count is restored afterwards."""
    check(isinstance(runs, int) and not isinstance(runs, bool) and runs >= 1, "runs", runs, "an integer >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            block = probe_block()
            block()  # first touch of the weights and the allocator's blocks
            times = []
            for _ in range(runs):
                t0 = time.thread_time()
                block()
                times.append(time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)
