"""Small experiment files for the experiment tests (tiny models, few tokens, few rows)."""

from __future__ import annotations

from pathlib import Path

import yaml

ALL_METHODS = ["single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8", "block_parallel",
               {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}]


def tiny(**over) -> dict:
    """A valid experiment: vit-tiny, 17 tokens, 2 nodes, all six methods, in-process."""
    d = {"name": "tiny", "model": {"name": "vit-tiny"}, "input": {"tokens": 17, "seed": 0},
         "methods": list(ALL_METHODS), "nodes": {"count": 2}, "topology": "star", "backend": "inprocess",
         "repetitions": 2, "warmup": 1, "timeout_s": 60}
    d.update(over)
    return d


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path
