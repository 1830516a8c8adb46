"""Load HF-format safetensors checkpoints from a local path (no hub access at run time).

ViT uses the key names of google/vit-base-patch16-224 (`vit.encoder.layer.N...`), GPT-2 those of
`gpt2` (`h.N.attn.c_attn...`, Conv1D weights stored [in, out], q/k/v fused). Each of our
parameters maps to one checkpoint key (or a slice of one) and a transform; loading is strict:
missing keys, unexpected keys and shape mismatches are errors naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from testbed.errors import ConfigError
from testbed.models.transformer import TransformerModel

# our parameter name -> (checkpoint key, fn(checkpoint tensor) -> our tensor, fn(ours) -> checkpoint part)
Mapping = dict[str, tuple[str, Callable, Callable]]
_ident = (lambda t: t, lambda t: t)


def _vit_map(model: TransformerModel) -> Mapping:
    m: Mapping = {
        "cls_token": ("vit.embeddings.cls_token", *_ident),
        "pos": ("vit.embeddings.position_embeddings", *_ident),
        "patch.weight": ("vit.embeddings.patch_embeddings.projection.weight", *_ident),
        "patch.bias": ("vit.embeddings.patch_embeddings.projection.bias", *_ident),
        "norm.weight": ("vit.layernorm.weight", *_ident),
        "norm.bias": ("vit.layernorm.bias", *_ident),
        "classifier.weight": ("classifier.weight", *_ident),
        "classifier.bias": ("classifier.bias", *_ident),
    }
    parts = {"ln1": "layernorm_before", "ln2": "layernorm_after", "attn.q": "attention.attention.query",
             "attn.k": "attention.attention.key", "attn.v": "attention.attention.value",
             "attn.o": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(model.cfg.n_layers):
        for ours, theirs in parts.items():
            for p in ("weight", "bias"):
                m[f"blocks.{i}.{ours}.{p}"] = (f"vit.encoder.layer.{i}.{theirs}.{p}", *_ident)
    return m


def _gpt2_map(model: TransformerModel) -> Mapping:
    D = model.cfg.dim
    T = (lambda t: t.T.contiguous(), lambda t: t.T.contiguous())  # Conv1D stores [in, out]
    m: Mapping = {"wte.weight": ("wte.weight", *_ident), "wpe.weight": ("wpe.weight", *_ident),
                  "norm.weight": ("ln_f.weight", *_ident), "norm.bias": ("ln_f.bias", *_ident)}
    for i in range(model.cfg.n_layers):
        h = f"h.{i}"
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for p in ("weight", "bias"):
                m[f"blocks.{i}.{ours}.{p}"] = (f"{h}.{theirs}.{p}", *_ident)
        for j, qkv in enumerate("qkv"):  # fused c_attn: columns [q | k | v]
            sl = slice(j * D, (j + 1) * D)
            m[f"blocks.{i}.attn.{qkv}.weight"] = (f"{h}.attn.c_attn.weight", lambda t, sl=sl: t[:, sl].T.contiguous(), T[1])
            m[f"blocks.{i}.attn.{qkv}.bias"] = (f"{h}.attn.c_attn.bias", lambda t, sl=sl: t[sl].contiguous(), _ident[1])
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            m[f"blocks.{i}.{ours}.weight"] = (f"{h}.{theirs}.weight", *T)
            m[f"blocks.{i}.{ours}.bias"] = (f"{h}.{theirs}.bias", *_ident)
    return m


def key_map(model: TransformerModel) -> Mapping:
    return _vit_map(model) if model.cfg.kind == "vit" else _gpt2_map(model)


def _checkpoint_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise ConfigError("weights_path", str(path), "a local .safetensors file, or a directory holding model.safetensors")
    return p


def load_hf_weights(model: TransformerModel, path: str | Path) -> TransformerModel:
    """Load a HF-format checkpoint into ``model`` (strict)."""
    sd = load_file(str(_checkpoint_file(path)))
    # GPT-2 checkpoints saved from GPT2LMHeadModel carry a "transformer." prefix and a tied lm_head
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # mask buffers
    mapping, used, ours = key_map(model), set(), {}
    for name, (key, to_ours, _) in mapping.items():
        if key not in sd:
            raise ConfigError("weights_path", str(path), f"a {model.cfg.kind} checkpoint with key {key!r} (missing)")
        ours[name] = to_ours(sd[key]).float()
        used.add(key)
    extra = sorted(set(sd) - used)
    if extra:
        raise ConfigError("weights_path", str(path), f"no keys beyond the model's; unexpected: {extra[:5]}")
    own = model.state_dict()
    for name, t in ours.items():
        if own[name].shape != t.shape:
            raise ConfigError("weights_path", str(path),
                              f"{mapping[name][0]} of shape {tuple(own[name].shape)} for this config, got {tuple(t.shape)}")
    model.load_state_dict(ours, strict=True)
    return model


def save_hf_weights(model: TransformerModel, path: str | Path) -> None:
    """Write ``model`` as a HF-format safetensors file (fused GPT-2 c_attn rebuilt from q, k, v)."""
    out: dict[str, torch.Tensor] = {}
    own = model.state_dict()
    for name, (key, _, to_theirs) in key_map(model).items():
        part = to_theirs(own[name].detach())
        if key.endswith("c_attn.weight") or key.endswith("c_attn.bias"):
            out.setdefault(key, []).append(part)  # type: ignore[arg-type]
        else:
            out[key] = part.contiguous()
    for key, v in list(out.items()):
        if isinstance(v, list):
            out[key] = torch.cat(v, dim=-1).contiguous()
    save_file(out, str(path))
