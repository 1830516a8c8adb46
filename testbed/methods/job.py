"""A job: everything one rank needs to build its shard and run inferences.

The same JobSpec drives the in-process reference, every node server (loopback,
Mininet, a real device) and the simulator's calibration, so all of them build
identical weights, inputs and codebooks from the same seed and files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from testbed.comm.base import Communicator
from testbed.errors import check


@dataclass
class JobSpec:
    model: str  # named config (testbed.models.CONFIGS), e.g. "vit-tiny"
    method: str  # single | tensor_parallel | sequence_parallel | sequence_parallel_int8 | block_parallel | astra
    world_size: int = 1
    tokens: int = 197  # ViT: patches + CLS; GPT-2: prompt length
    params: dict[str, Any] = field(default_factory=dict)  # method params, e.g. {"groups": 1, "codebook_size": 1024}
    seed: int = 0  # weights (when no weights_path) and input
    batch: int = 1
    weights_path: str | None = None  # HF-format safetensors file or directory
    codebook_path: str | None = None  # astra: codebooks made by testbed.methods.astra (torch.save file)
    threads: int = 1  # torch intra-op threads per rank
    dataset: str | None = None  # evaluation split (testbed.models.datasets) used as the input batch instead of random input
    generate: int = 0  # causal LMs: greedy tokens decoded after prefill (testbed.methods.decode); 0: prefill only

    def __post_init__(self) -> None:
        check(isinstance(self.world_size, int) and self.world_size >= 1, "world_size", self.world_size, "an integer >= 1")
        check(isinstance(self.tokens, int) and self.tokens >= 1, "tokens", self.tokens, "an integer >= 1")
        check(isinstance(self.batch, int) and self.batch >= 1, "batch", self.batch, "an integer >= 1")
        check(isinstance(self.threads, int) and self.threads >= 1, "threads", self.threads, "an integer >= 1")
        check(isinstance(self.generate, int) and self.generate >= 0, "generate", self.generate, "an integer >= 0")

    #: the fields that name files a rank reads (``model`` names a config and ``dataset`` a bundled
    #: split, testbed.models.datasets: neither is a path). A node started with --allow-dir
    #: checks exactly these (testbed.node.access); a new path field must be listed here.
    FILE_FIELDS = ("weights_path", "codebook_path")

    def file_paths(self) -> dict[str, str]:
        """The files this job reads, by field (only those set)."""
        return {f: getattr(self, f) for f in self.FILE_FIELDS if getattr(self, f)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        return cls(**d)


class RankRunner:
    """Builds one rank's shard of a job once, then runs inferences on demand."""

    def __init__(self, job: JobSpec, rank: int, comm: Communicator, model=None):
        """``model``: the job's model already built (ranks in one process may share it: inference
        never writes weights); None builds it."""
        from testbed.methods import build_method
        from testbed.models import build_model

        self.job, self.rank, self.comm = job, rank, comm
        # nodes never write weights: a checkpoint stays mapped read-only, one copy per host (loader)
        self.model = model if model is not None else build_model(job.model, seed=job.seed,
                                                                  weights_path=job.weights_path, share_weights=True)
        if job.dataset:
            from testbed.models.datasets import load_split

            self.input, self.labels = load_split(job.dataset)
        else:
            self.input, self.labels = self.model.make_input(job.tokens, batch=job.batch, seed=job.seed), None
        self.method = build_method(job.method, self.model, job.params, rank, job.world_size, comm,
                                   tokens=job.tokens, codebook_path=job.codebook_path)

        self.token_times_s: list[float] = []  # of the latest inference (job.generate > 0), see infer
        self.generated: torch.Tensor | None = None

    @torch.inference_mode()
    def infer(self) -> tuple[torch.Tensor | None, float]:
        """One inference. Returns (output on the rank that holds it else None, wall seconds).

        With ``job.generate`` > 0 the inference is prefill then that many greedy tokens
        (Method.generate): the output is still prefill's (the logits the reference is compared
        with), ``generated`` holds the token ids [B, generate] on the output rank and
        ``token_times_s`` the seconds from the start to each token (the first: time to first token).
        The communicator's trace holds this inference's schedule afterwards.
        """
        t0 = time.perf_counter()  # before the trace's first mark: its segments always fit inside the wall time
        self.comm.trace.start()
        if self.job.generate:
            self.generated, self.token_times_s = self.method.generate(self.input, self.job.generate)
            out = self.method.prefill_output if self.generated is not None else None
        else:
            out = self.method.forward(self.input)
        self.comm.trace.finish()  # holds the last segment to its device time where the node paces compute
        return out, time.perf_counter() - t0
