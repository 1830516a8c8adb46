"""HF checkpoint directories: config.json <-> ModelConfig, and safetensors files mapped read-only.

A checkpoint is a ``.safetensors`` file, or a directory holding ``model.safetensors`` or several
shards listed by ``model.safetensors.index.json`` (``{"weight_map": {key: file}}``). Files are
parsed here (8-byte header length, JSON header, raw little-endian data) and every tensor is a view
of one read-only ``mmap`` of its file: nothing is read until used, and processes mapping the same
file share its pages. The Llama family's config.json (model_type llama, qwen2) is read with every
field this testbed does not model refused by name (sliding windows, mixtures of experts, biases
beyond Qwen2's q/k/v, other activations, other rope scalings).
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from testbed.errors import ConfigError, check
from testbed.models.config import ModelConfig

INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MODEL_TYPES = ("llama", "qwen2")
# config.json fields that change the architecture; each must be absent or hold the value shown
_UNSUPPORTED = {"sliding_window": "null (or use_sliding_window: false)", "num_local_experts": "absent (no MoE)",
                "num_experts": "absent (no MoE)", "n_routed_experts": "absent (no MoE)",
                "mlp_bias": "false", "attention_bias": "false (Qwen2's q/k/v biases are implied by model_type)",
                "hidden_act": "silu", "pretraining_tp": "1"}


def _err(path, allowed: str) -> ConfigError:
    return ConfigError("weights_path", str(path), allowed)


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig described by ``path``/config.json (a Llama-family checkpoint directory)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not f.is_file():
        raise _err(path, "a checkpoint directory holding config.json (HF format) beside its safetensors files")
    try:
        c = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise _err(f, f"a readable JSON config.json ({e})") from None
    mt = c.get("model_type")
    check(mt in MODEL_TYPES, "config.json model_type", mt, " | ".join(MODEL_TYPES))
    for key, allowed in _UNSUPPORTED.items():
        v = c.get(key)
        ok = {"sliding_window": v is None or c.get("use_sliding_window") is False,
              "mlp_bias": not v, "attention_bias": not v, "hidden_act": v in (None, "silu"),
              "pretraining_tp": v in (None, 1)}.get(key, v is None)
        check(ok, f"config.json {key}", v, allowed)
    H, D = c["num_attention_heads"], c["hidden_size"]
    check(c.get("head_dim") in (None, D // H), "config.json head_dim", c.get("head_dim"), f"hidden_size / num_attention_heads = {D // H}")
    scaling = c.get("rope_scaling") or {}
    scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    check(scaling.get("rope_type") in (None, "linear", "llama3") if scaling else True, "config.json rope_scaling",
          scaling, "null, linear or llama3")
    scaling = {k: v for k, v in scaling.items() if k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings")}
    return ModelConfig("llama", dim=D, n_layers=c["num_hidden_layers"], n_heads=H, mlp_dim=c["intermediate_size"],
                       ln_eps=float(c.get("rms_norm_eps", 1e-6)), vocab_size=c["vocab_size"],
                       max_positions=c.get("max_position_embeddings", 2048),
                       n_kv_heads=c.get("num_key_value_heads", H), rope_theta=float(c.get("rope_theta", 10000.0)),
                       rope_scaling=tuple(sorted(scaling.items())), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                       qkv_bias=mt == "qwen2")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json of a Llama-family ``cfg`` (model_type qwen2 where q/k/v carry biases)."""
    return {"model_type": "qwen2" if cfg.qkv_bias else "llama", "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.mlp_dim, "rms_norm_eps": cfg.ln_eps,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_positions,
            "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) or None,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "torch_dtype": "float32"}


_ARCH = ("dim", "n_layers", "n_heads", "kv_heads", "mlp_dim", "vocab_size", "rope_theta", "rope_scaling",
         "tie_embeddings", "qkv_bias", "ln_eps")


def check_matches(ours: ModelConfig, theirs: ModelConfig, path: str) -> None:
    """A ConfigError naming the first architecture field where the checkpoint differs from ``ours``."""
    for name in _ARCH:
        a, b = getattr(ours, name), getattr(theirs, name)
        if a != b:
            raise ConfigError("weights_path", path, f"a checkpoint of this model ({name}={a!r}; its config.json gives {b!r})")
    assert {f.name for f in fields(ModelConfig)} >= set(_ARCH) - {"kv_heads"}


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, the shards its index lists (in name
    order), or a directory's model.safetensors."""
    p = Path(path)
    if p.is_file():
        return [p]
    if (p / INDEX).is_file():
        try:
            weight_map = json.loads((p / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise _err(p / INDEX, f"an index JSON with a weight_map ({e})") from None
        files = [p / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise _err(path, f"every shard its index lists (missing: {missing[:3]})")
        return files
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"]
    raise _err(path, f"a local .safetensors file, or a directory holding model.safetensors or {INDEX} with its shards")


def _map_file(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of a read-only mmap (a copy where misaligned)."""
    with open(f, "rb") as fh:
        try:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        except (struct.error, ValueError) as e:
            raise _err(f, f"a safetensors file ({e})") from None
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # the buffer is read-only on purpose: parameters are never written
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(mm, dtype=torch.uint8)
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise _err(f, f"tensors of dtype {' | '.join(_DTYPES)}; {key} is {meta['dtype']}")
        s, e = meta["data_offsets"]
        part = raw[8 + n + s:8 + n + e]
        size = torch.empty((), dtype=dtype).element_size()
        if (8 + n + s) % size:
            part = part.clone()
        out[key] = part.view(dtype).reshape(meta["shape"])
    return out


def mmap_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at ``path``, keyed by name, mapped read-only from its files."""
    sd: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        for key, t in _map_file(f).items():
            if key in sd:
                raise _err(path, f"each tensor in one shard; {key} is in several")
            sd[key] = t
    return sd


def write_checkpoint(path: str | Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """A HF checkpoint directory: config.json, then ``tensors`` in one model.safetensors or in
    ``shards`` files model-0000x-of-0000y.safetensors with their index."""
    check(isinstance(shards, int) and shards >= 1, "shards", shards, "an integer >= 1")
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    keys = list(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, str(d / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k].contiguous() for k in part}, str(d / name))
        weight_map.update(dict.fromkeys(part, name))
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
