"""Task accuracy of a checkpoint through the real node runtime, and through the training simulation.

``runtime_eval`` is what a node does: N RankRunners (testbed.methods.job) in-process, one per rank, each
building the model from the checkpoint's safetensors, the method (``astra`` reads the checkpoint's
codebook file) and the evaluation split named in JobSpec.dataset; the output rank's logits are
compared with the split's labels. ``sim_accuracy`` runs AstraSim (the training forward) on the same
images so the two can be checked against each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from testbed.comm import run_inprocess
from testbed.methods.job import JobSpec, RankRunner
from testbed.train.astra_sim import AstraSim
from testbed.train.loop import accuracy


@dataclass
class EvalResult:
    accuracy: float  # top-1 on the split, 0..1
    logits: torch.Tensor  # [N_images, classes] from the output rank
    labels: torch.Tensor  # [N_images]
    wall_s: float  # inference wall seconds on the output rank (whole split in one batch)


def runtime_eval(model: str, method: str, world_size: int, weights_path: str, codebook_path: str | None = None,
                 params: dict[str, Any] | None = None, dataset: str = "digits-test", tokens: int = 65,
                 threads: int = 1) -> EvalResult:
    """Accuracy of ``method`` over ``world_size`` in-process ranks on split ``dataset``.

    ``tokens``: the model's token count for the split's images (vit-digits: 64 patches + CLS = 65).
    ``threads``: torch intra-op threads per rank (JobSpec.threads).
    """
    job = JobSpec(model=model, method=method, world_size=world_size, tokens=tokens, params=dict(params or {}),
                  weights_path=weights_path, codebook_path=codebook_path, dataset=dataset, threads=threads)

    def rank_fn(rank: int, comm) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        runner = RankRunner(job, rank, comm)
        out, wall = runner.infer()
        return out, runner.labels, wall

    results = run_inprocess(world_size, rank_fn)
    logits, labels, wall = next(r for r in results if r[0] is not None)
    acc = float((logits.argmax(-1) == labels).float().mean())
    return EvalResult(acc, logits, labels, wall)


@torch.no_grad()
def sim_accuracy(model, codebooks: torch.Tensor, world_size: int, dct: bool, images: torch.Tensor,
                 labels: torch.Tensor) -> float:
    """Accuracy of the training-time simulation (eval mode: no noise) on ``images``."""
    sim = AstraSim(model, codebooks, world_size, dct).eval()
    return accuracy(sim, images, labels)
