"""Load HF-format safetensors checkpoints from a local path (no hub access at run time).

ViT uses the key names of google/vit-base-patch16-224 (`vit.encoder.layer.N...`), GPT-2 those of
`gpt2` (`h.N.attn.c_attn...`, Conv1D weights stored [in, out], q/k/v fused), the Llama family
those of LlamaForCausalLM / Qwen2ForCausalLM (`model.layers.N.self_attn.q_proj...`) in a directory
with config.json and one `model.safetensors` or several `model-0000x-of-0000y.safetensors` listed
by `model.safetensors.index.json` (hf_checkpoint.py). Each of our parameters maps to one
checkpoint key (or a slice of one) and a transform; loading is strict: missing keys, unexpected
keys and shape mismatches are errors naming the key (and both shapes).

Tensors are mapped read-only from the files (mmap): where the checkpoint holds the compute dtype
(fp32) and no transform is needed (Llama), the model's parameters ARE the file's pages, so nodes
on one host that load the same file share one copy in the page cache. fp16/bf16 tensors are
converted to fp32 (a private copy per process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from testbed.errors import ConfigError
from testbed.models.hf_checkpoint import check_matches, mmap_checkpoint, read_hf_config
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


def _llama_map(model: TransformerModel) -> Mapping:
    cfg = model.cfg
    m: Mapping = {"wte.weight": ("model.embed_tokens.weight", *_ident), "norm.weight": ("model.norm.weight", *_ident)}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = ("lm_head.weight", *_ident)
    parts = {"ln1.weight": "input_layernorm.weight", "ln2.weight": "post_attention_layernorm.weight",
             "attn.q.weight": "self_attn.q_proj.weight", "attn.k.weight": "self_attn.k_proj.weight",
             "attn.v.weight": "self_attn.v_proj.weight", "attn.o.weight": "self_attn.o_proj.weight",
             "mlp.gate.weight": "mlp.gate_proj.weight", "mlp.up.weight": "mlp.up_proj.weight",
             "mlp.down.weight": "mlp.down_proj.weight"}
    if cfg.qkv_bias:
        parts.update({f"attn.{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"})
    for i in range(cfg.n_layers):
        for ours, theirs in parts.items():
            m[f"blocks.{i}.{ours}"] = (f"model.layers.{i}.{theirs}", *_ident)
    return m


def key_map(model: TransformerModel) -> Mapping:
    return {"vit": _vit_map, "gpt2": _gpt2_map, "llama": _llama_map}[model.cfg.kind](model)


def load_hf_weights(model: TransformerModel, path: str | Path, share: bool = False) -> TransformerModel:
    """Load a HF-format checkpoint into ``model`` (strict). Llama-family checkpoints need their
    config.json, which must describe ``model.cfg``.

    ``share``: parameters stay views of the read-only file mapping where no conversion is needed
    (co-located processes then share one copy); only for models nobody writes to (inference).
    Without it every parameter is a private copy (training may update it)."""
    if model.cfg.kind == "llama":
        check_matches(model.cfg, read_hf_config(path), str(path))
    sd = mmap_checkpoint(path)
    if model.cfg.kind == "llama":
        if model.cfg.tie_embeddings:  # some tied checkpoints store the head anyway
            sd.pop("lm_head.weight", None)
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer older saves kept
    else:
        # GPT-2 checkpoints saved from GPT2LMHeadModel carry a "transformer." prefix and a tied lm_head
        sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # mask buffers
    mapping, used, ours = key_map(model), set(), {}
    for name, (key, to_ours, _) in mapping.items():
        if key not in sd:
            raise ConfigError("weights_path", str(path), f"a {model.cfg.kind} checkpoint with key {key!r} (missing)")
        t = to_ours(sd[key]).float()
        ours[name] = t if share or t.data_ptr() != sd[key].data_ptr() else t.clone()
        used.add(key)
    extra = sorted(set(sd) - used)
    if extra:
        raise ConfigError("weights_path", str(path), f"no keys beyond the model's; unexpected: {extra[:5]}")
    own = model.state_dict()
    for name, t in ours.items():
        if own[name].shape != t.shape:
            raise ConfigError("weights_path", str(path),
                              f"{mapping[name][0]} of shape {tuple(own[name].shape)} for this config, got {tuple(t.shape)}")
    # assign: parameters take the (mmap-backed where possible) tensors instead of copying into them
    model.load_state_dict(ours, strict=True, assign=True)
    return model


def save_hf_weights(model: TransformerModel, path: str | Path, dtype: torch.dtype = torch.float32,
                    shards: int = 1) -> None:
    """Write ``model`` in HF format: a safetensors file (ViT, GPT-2: fused c_attn rebuilt from q, k, v),
    or for the Llama family a directory with config.json, ``shards`` files and their index, in ``dtype``."""
    if model.cfg.kind == "llama":
        from testbed.models.hf_checkpoint import write_checkpoint

        own = model.state_dict()
        write_checkpoint(path, model.cfg, {key: own[name].detach().to(dtype) for name, (key, _, _) in
                                           key_map(model).items()}, shards)
        return
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
