"""The Llama-family decoder against an independent forward written from the equations, and its
HF checkpoints (written here by hand in HF's layout: sharded, fp32/fp16/bf16, with an index)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from testbed.errors import ConfigError
from testbed.models import build_model, get_config, read_hf_config, save_hf_weights
from testbed.models.hf_checkpoint import hf_config


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _inv_freq(cfg):
    """RoPE frequencies with llama3 scaling, written from Meta's reference (apply_scaling), band by band."""
    hd = cfg.head_dim
    freqs = [1.0 / cfg.rope_theta ** (2 * i / hd) for i in range(hd // 2)]
    s = dict(cfg.rope_scaling)
    if s.get("rope_type") != "llama3":
        return torch.tensor(freqs)
    lo_wl, hi_wl = s["original_max_position_embeddings"] / s["low_freq_factor"], s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(f)
        elif wl > lo_wl:
            out.append(f / s["factor"])
        else:
            sm = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - sm) * f / s["factor"] + sm * f)
    return torch.tensor(out)


def reference_forward(sd, cfg, ids):
    """Llama from the equations and HF tensor names: RMSNorm, RoPE as complex rotations of
    (x_i, x_{i+hd/2}) pairs, GQA by repeating KV heads, SwiGLU; logits of the last token."""
    w = lambda k: sd[k].float()
    H, KV, hd, T = cfg.n_heads, cfg.kv_heads, cfg.head_dim, ids.shape[1]
    x = w("model.embed_tokens.weight")[ids[0]]  # (T, D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * _inv_freq(cfg).double()[None]  # (T, hd/2)
    rot = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)

    def rope(t):  # (T, h, hd): pairs (i, i + hd/2) rotated by angle pos * f_i
        c = torch.complex(t[..., :hd // 2], t[..., hd // 2:]) * rot[:, None]
        return torch.cat([c.real, c.imag], -1)

    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        a = _rms(x, w(p + "input_layernorm.weight"), cfg.ln_eps)
        proj = {}
        for n in "qkv":
            proj[n] = a @ w(p + f"self_attn.{n}_proj.weight").T
            if cfg.qkv_bias:
                proj[n] = proj[n] + w(p + f"self_attn.{n}_proj.bias")
        q, k, v = proj["q"].view(T, H, hd), proj["k"].view(T, KV, hd), proj["v"].view(T, KV, hd)
        q, k = rope(q), rope(k)
        heads = []
        for h in range(H):
            g = h // (H // KV)
            att = (q[:, h] @ k[:, g].T) / math.sqrt(hd)
            heads.append(att.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, g])
        x = x + torch.cat(heads, -1) @ w(p + "self_attn.o_proj.weight").T
        m = _rms(x, w(p + "post_attention_layernorm.weight"), cfg.ln_eps)
        gate, up = m @ w(p + "mlp.gate_proj.weight").T, m @ w(p + "mlp.up_proj.weight").T
        x = x + (gate * torch.sigmoid(gate) * up) @ w(p + "mlp.down_proj.weight").T
    x = _rms(x, w("model.norm.weight"), cfg.ln_eps)
    head = w("model.embed_tokens.weight") if cfg.tie_embeddings else w("lm_head.weight")
    return (x[-1] @ head.T)[None]


def hf_checkpoint(cfg, seed=0) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM / Qwen2ForCausalLM keys, Linear weights [out, in]."""
    g, D, M, KVD = torch.Generator().manual_seed(seed), cfg.dim, cfg.mlp_dim, cfg.kv_dim
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)
    sd = {"model.embed_tokens.weight": r(cfg.vocab_size, D), "model.norm.weight": 1 + r(D)}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = r(cfg.vocab_size, D)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + r(D), p + "post_attention_layernorm.weight": 1 + r(D),
                   p + "self_attn.q_proj.weight": r(D, D), p + "self_attn.k_proj.weight": r(KVD, D),
                   p + "self_attn.v_proj.weight": r(KVD, D), p + "self_attn.o_proj.weight": r(D, D),
                   p + "mlp.gate_proj.weight": r(M, D), p + "mlp.up_proj.weight": r(M, D),
                   p + "mlp.down_proj.weight": r(D, M)})
        if cfg.qkv_bias:
            sd.update({p + f"self_attn.{n}_proj.bias": r(KVD if n != "q" else D) for n in "qkv"})
    return sd


def write_hf(d, cfg, sd, dtype=torch.float32, shards=1, config=None):
    """A checkpoint directory as HF's save_pretrained lays it out."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config or hf_config(cfg)))
    keys = sorted(sd)
    if shards == 1:
        save_file({k: sd[k].to(dtype) for k in keys}, str(d / "model.safetensors"))
        return d
    wm = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        save_file({k: sd[k].to(dtype) for k in part}, str(d / name))
        wm.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return d


CASES = {
    "tiny": get_config("llama-tiny"),  # GQA (2 query heads per KV head), untied, llama3 rope scaling
    "mqa-tied-qwen": get_config("llama-tiny", n_kv_heads=1, tie_embeddings=True, qkv_bias=True, rope_scaling=(),
                                rope_theta=1e6, ln_eps=1e-6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_forward_from_the_equations(case, tmp_path):
    cfg = CASES[case]
    sd = hf_checkpoint(cfg, seed=1)
    model = build_model(cfg, weights_path=str(write_hf(tmp_path / "ck", cfg, sd)))
    ids = model.make_input(70, seed=2)  # beyond original_max_position_embeddings=64: the scaled band matters
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference_forward(sd, cfg, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,shards", [(torch.bfloat16, 3), (torch.float16, 2), (torch.float32, 1)])
def test_hf_checkpoint_gives_the_in_memory_models_logits(dtype, shards, tmp_path):
    cfg = get_config("llama-tiny")
    model = build_model(cfg, seed=4)
    with torch.no_grad():  # the in-memory model at the checkpoint's precision
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    names = {"wte.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    own = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn.q": "self_attn.q_proj",
           "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
           "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
    sd = {}
    for name, t in model.state_dict().items():
        if name in names:
            sd[names[name]] = t
        else:
            _, i, *rest = name.split(".")
            sd[f"model.layers.{i}.{own['.'.join(rest[:-1])]}.{rest[-1]}"] = t
    d = write_hf(tmp_path / "ck", cfg, sd, dtype=dtype, shards=shards)
    assert len(list(d.glob("*.safetensors"))) == shards
    loaded = build_model("llama-tiny", seed=9, weights_path=str(d))
    ids = model.make_input(17, batch=2, seed=3)
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))
    # and our writer round-trips through the same reader
    save_hf_weights(model, tmp_path / "ours", dtype=dtype, shards=shards)
    with torch.inference_mode():
        assert torch.equal(build_model("llama-tiny", weights_path=str(tmp_path / "ours"))(ids), model(ids))


def test_read_config_gives_the_named_shapes(tmp_path):
    for name in ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "llama-3-8b"):
        cfg = get_config(name)
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(hf_config(cfg)))
        got = read_hf_config(d)
        assert (got.dim, got.kv_heads, got.rope_scaling, got.tie_embeddings, got.qkv_bias) == \
               (cfg.dim, cfg.kv_heads, cfg.rope_scaling, cfg.tie_embeddings, cfg.qkv_bias)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    cfg = get_config("llama-tiny")
    sd = hf_checkpoint(cfg)
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(cfg.dim, cfg.dim)  # MHA-shaped K
    d = write_hf(tmp_path / "ck", cfg, sd)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight of shape \(48, 96\).*got \(96, 96\)"):
        build_model(cfg, weights_path=str(d))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    cfg = get_config("llama-tiny")
    sd = hf_checkpoint(cfg)
    del sd["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ConfigError, match="mlp.up_proj.weight' \\(missing\\)"):
        build_model(cfg, weights_path=str(write_hf(tmp_path / "a", cfg, sd)))
    sd = {**hf_checkpoint(cfg), "model.layers.0.mlp.extra.weight": torch.zeros(2)}
    with pytest.raises(ConfigError, match="unexpected.*mlp.extra.weight"):
        build_model(cfg, weights_path=str(write_hf(tmp_path / "b", cfg, sd)))


def test_bad_checkpoints_are_one_clear_error(tmp_path):
    cfg = get_config("llama-tiny")
    d = write_hf(tmp_path / "noconf", cfg, hf_checkpoint(cfg))
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        build_model(cfg, weights_path=str(d))
    for field, value in (("sliding_window", 4096), ("num_local_experts", 8), ("mlp_bias", True), ("hidden_act", "gelu"),
                         ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("model_type", "mixtral")):
        conf = {**hf_config(cfg), field: value}
        d = write_hf(tmp_path / field, cfg, hf_checkpoint(cfg), config=conf)
        with pytest.raises(ConfigError, match=f"config.json {field}"):
            build_model(cfg, weights_path=str(d))
    # Qwen2 writes sliding_window but switches it off: that is fine
    ok = write_hf(tmp_path / "qwen", cfg, hf_checkpoint(cfg), config={**hf_config(cfg), "sliding_window": 4096,
                                                                    "use_sliding_window": False})
    build_model(cfg, weights_path=str(ok))
    # a config.json of another model than the named one
    other = write_hf(tmp_path / "other", cfg, hf_checkpoint(cfg), config={**hf_config(cfg), "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="kv_heads=6; its config.json gives 3"):
        build_model(cfg, weights_path=str(other))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(hf_config(cfg)))
    with pytest.raises(ConfigError, match="index.json"):
        build_model(cfg, weights_path=str(empty))


def test_named_llama_configs_are_consistent():
    for name, kv in (("smollm2-135m", 3), ("qwen2.5-0.5b", 2), ("llama-3.2-1b", 8), ("llama-3-8b", 8)):
        cfg = get_config(name)
        assert cfg.kind == "llama" and cfg.causal and cfg.kv_heads == kv and cfg.n_heads % kv == 0
    with pytest.raises(ConfigError, match="n_kv_heads"):
        get_config("llama-tiny", n_kv_heads=5)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        get_config("gpt2-tiny", n_kv_heads=2)
