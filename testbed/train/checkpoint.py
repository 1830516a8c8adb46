"""Checkpoint directories that the node runtime loads unchanged.

A checkpoint is a directory holding
- ``model.safetensors``: HF-format weights (testbed.models.save_hf_weights), the file
  ``build_model(name, weights_path=DIR)`` reads;
- ``codebooks.pt`` (ASTRA checkpoints only): [L, G, K, D//G] written by vq.save_codebooks, the
  file ``build_method("astra", ..., codebook_path=DIR/codebooks.pt)`` reads; its meta carries
  groups, codebook_size and dct so a user can rebuild the method's params from the file;
- ``train.json``: the training config, history and accuracies (provenance, never read by nodes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from testbed.errors import ConfigError
from testbed.methods.vq import load_codebooks, save_codebooks
from testbed.models import TransformerModel, build_model, save_hf_weights

MODEL_FILE = "model.safetensors"
CODEBOOK_FILE = "codebooks.pt"
META_FILE = "train.json"


def save_checkpoint(directory: str | Path, model: TransformerModel, codebooks: torch.Tensor | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``codebooks``, ``meta``) into ``directory`` (created). Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_hf_weights(model, d / MODEL_FILE)
    if codebooks is not None:
        cb_meta = {k: v for k, v in (meta or {}).get("config", {}).items()
                   if k in ("groups", "codebook_size", "dct", "world_size", "naq_lambda", "beta")}
        save_codebooks(d / CODEBOOK_FILE, codebooks, {"model": model_name(meta), **cb_meta})
    (d / META_FILE).write_text(json.dumps(meta or {}, indent=1, sort_keys=True) + "\n")
    return d


def model_name(meta: dict[str, Any] | None) -> str:
    return str(((meta or {}).get("config") or {}).get("model", "vit-digits"))


def codebook_path(directory: str | Path) -> str | None:
    """DIR/codebooks.pt if the checkpoint has codebooks, else None."""
    p = Path(directory) / CODEBOOK_FILE
    return str(p) if p.is_file() else None


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The train.json of a checkpoint ({} if absent)."""
    p = Path(directory) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def load_checkpoint(directory: str | Path, model: str | None = None
                    ) -> tuple[TransformerModel, torch.Tensor | None, dict[str, Any]]:
    """(model in eval mode, codebooks or None, meta) from a checkpoint directory.

    ``model``: the named config; None -> the one recorded in train.json.
    """
    d = Path(directory)
    if not (d / MODEL_FILE).is_file():
        raise ConfigError("checkpoint", str(directory), f"a directory holding {MODEL_FILE} (made by `testbed train`)")
    meta = read_meta(d)
    net = build_model(model or model_name(meta), weights_path=str(d))
    cb_file = codebook_path(d)
    codebooks = load_codebooks(cb_file)[0] if cb_file else None
    return net, codebooks, meta
