"""Inference methods: each turns a model into the work of one rank.

``build_method(name, model, params, rank, world_size, comm, tokens, codebook_path)`` returns a
Method whose ``forward(inp)`` runs that rank's part and returns the output on ``output_rank``.
Methods talk to other ranks only through the Communicator. The layer stands on models and comm.

Without building anything: ``resolve_params(name, params, cfg)`` is a method's params with its
defaults filled in and checked, ``comm_schedule(name, cfg, tokens, world_size, params, batch)``
every rank's collectives with their exact messages (what its trace will record).
"""

from __future__ import annotations

from typing import Any

from testbed.comm.base import Communicator
from testbed.errors import ConfigError
from testbed.methods.astra import Astra
from testbed.methods.base import CommSchedule, Method, parse_params, token_chunks
from testbed.methods.block_parallel import BlockParallel, decoupled_reference
from testbed.methods.sequence_parallel import SequenceParallel, SequenceParallelInt8
from testbed.methods.single import Single
from testbed.methods.tensor_parallel import TensorParallel

METHODS = ("single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8", "block_parallel", "astra")
_CLASSES: dict[str, type[Method]] = {c.name: c for c in (Single, TensorParallel, SequenceParallel,
                                                          SequenceParallelInt8, BlockParallel, Astra)}


def method_class(name: str) -> type[Method]:
    if name not in _CLASSES:
        raise ConfigError("method", name, ", ".join(METHODS))
    return _CLASSES[name]


def resolve_params(name: str, params: dict[str, Any] | None, cfg=None, **kw) -> dict[str, Any]:
    """Method ``name``'s params resolved as the method itself resolves them (see Method.resolve_params)."""
    return method_class(name).resolve_params(params, cfg, **kw)


def comm_schedule(name: str, cfg, tokens: int, world_size: int, params: dict[str, Any] | None = None,
                  batch: int = 1) -> CommSchedule:
    """Method ``name``'s stated schedule (see Method.schedule); ``cfg`` a ModelConfig."""
    return method_class(name).schedule(cfg, tokens, world_size, params, batch)


def build_method(name: str, model, params: dict[str, Any] | None, rank: int, world_size: int, comm: Communicator,
                 tokens: int, codebook_path: str | None = None) -> Method:
    """Rank ``rank``'s share of method ``name`` on ``model`` for inputs of ``tokens`` tokens."""
    cls = method_class(name)
    if codebook_path is not None and name != "astra":
        raise ConfigError("codebook_path", codebook_path, "None unless method is 'astra'")
    return cls(model, params or {}, rank, world_size, comm, tokens, codebook_path)


__all__ = ["METHODS", "build_method", "method_class", "resolve_params", "comm_schedule", "parse_params",
           "CommSchedule", "Method", "token_chunks", "decoupled_reference", "Single", "TensorParallel",
           "SequenceParallel", "SequenceParallelInt8", "BlockParallel", "Astra"]
