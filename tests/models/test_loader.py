"""HF-format safetensors loading. Checkpoints are written by hand with HF key names and layouts, and
the loaded model is checked against an independent forward pass written in HF's conventions, so a
wrong key, transpose or q/k/v order in the loader fails here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from testbed.errors import ConfigError
from testbed.models import build_model, get_config, load_hf_weights, save_hf_weights


def _rand(gen, *shape):
    return 0.1 * torch.randn(*shape, generator=gen)


def gpt2_checkpoint(cfg, seed=0) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel keys: Conv1D weights [in, out], q/k/v fused in c_attn [D, 3D]."""
    g, D, M = torch.Generator().manual_seed(seed), cfg.dim, cfg.mlp_dim
    sd = {"transformer.wte.weight": _rand(g, cfg.vocab_size, D), "transformer.wpe.weight": _rand(g, cfg.max_positions, D),
          "transformer.ln_f.weight": 1 + _rand(g, D), "transformer.ln_f.bias": _rand(g, D)}
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + _rand(g, D), p + "ln_1.bias": _rand(g, D),
                   p + "attn.c_attn.weight": _rand(g, D, 3 * D), p + "attn.c_attn.bias": _rand(g, 3 * D),
                   p + "attn.c_proj.weight": _rand(g, D, D), p + "attn.c_proj.bias": _rand(g, D),
                   p + "ln_2.weight": 1 + _rand(g, D), p + "ln_2.bias": _rand(g, D),
                   p + "mlp.c_fc.weight": _rand(g, D, M), p + "mlp.c_fc.bias": _rand(g, M),
                   p + "mlp.c_proj.weight": _rand(g, M, D), p + "mlp.c_proj.bias": _rand(g, D),
                   p + "attn.bias": torch.tril(torch.ones(1, 1, 8, 8))})  # HF's mask buffer: ignored
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # tied
    return sd


def hf_gpt2_forward(sd, cfg, ids):
    """GPT-2 as HF computes it, straight from the checkpoint tensors."""
    w = lambda k: sd["transformer." + k]
    D, H, T = cfg.dim, cfg.n_heads, ids.shape[1]
    x = w("wte.weight")[ids] + w("wpe.weight")[torch.arange(T)]
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        a = F.layer_norm(x, (D,), w(p + "ln_1.weight"), w(p + "ln_1.bias"), cfg.ln_eps)
        q, k, v = (a @ w(p + "attn.c_attn.weight") + w(p + "attn.c_attn.bias")).split(D, dim=2)
        q, k, v = (t.view(1, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / (D // H) ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(1, T, D)
        x = x + y @ w(p + "attn.c_proj.weight") + w(p + "attn.c_proj.bias")
        m = F.layer_norm(x, (D,), w(p + "ln_2.weight"), w(p + "ln_2.bias"), cfg.ln_eps)
        h = F.gelu(m @ w(p + "mlp.c_fc.weight") + w(p + "mlp.c_fc.bias"), approximate="tanh")
        x = x + h @ w(p + "mlp.c_proj.weight") + w(p + "mlp.c_proj.bias")
    x = F.layer_norm(x, (D,), w("ln_f.weight"), w("ln_f.bias"), cfg.ln_eps)
    return x[:, -1] @ w("wte.weight").T


def vit_checkpoint(cfg, seed=0) -> dict[str, torch.Tensor]:
    """ViTForImageClassification keys (google/vit-base-patch16-224): Linear weights [out, in]."""
    g, D, M, P = torch.Generator().manual_seed(seed), cfg.dim, cfg.mlp_dim, cfg.patch_size
    n = (cfg.image_size // P) ** 2
    sd = {"vit.embeddings.cls_token": _rand(g, 1, 1, D), "vit.embeddings.position_embeddings": _rand(g, 1, n + 1, D),
          "vit.embeddings.patch_embeddings.projection.weight": _rand(g, D, cfg.channels, P, P),
          "vit.embeddings.patch_embeddings.projection.bias": _rand(g, D),
          "vit.layernorm.weight": 1 + _rand(g, D), "vit.layernorm.bias": _rand(g, D),
          "classifier.weight": _rand(g, cfg.n_classes, D), "classifier.bias": _rand(g, cfg.n_classes)}
    for i in range(cfg.n_layers):
        p = f"vit.encoder.layer.{i}."
        for name, (o, iw) in {"attention.attention.query": (D, D), "attention.attention.key": (D, D),
                              "attention.attention.value": (D, D), "attention.output.dense": (D, D),
                              "intermediate.dense": (M, D), "output.dense": (D, M)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = _rand(g, o, iw), _rand(g, o)
        for ln in ("layernorm_before", "layernorm_after"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + _rand(g, D), _rand(g, D)
    return sd


def hf_vit_forward(sd, cfg, images):
    D, H = cfg.dim, cfg.n_heads
    lin = lambda x, k: F.linear(x, sd[k + ".weight"], sd[k + ".bias"])
    x = F.conv2d(images, sd["vit.embeddings.patch_embeddings.projection.weight"],
                 sd["vit.embeddings.patch_embeddings.projection.bias"], stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd["vit.embeddings.cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["vit.embeddings.position_embeddings"]
    B, T, _ = x.shape
    for i in range(cfg.n_layers):
        p = f"vit.encoder.layer.{i}."
        a = F.layer_norm(x, (D,), sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"], cfg.ln_eps)
        q, k, v = (lin(a, p + "attention.attention." + n).view(B, T, H, D // H).transpose(1, 2) for n in ("query", "key", "value"))
        y = ((q @ k.transpose(-1, -2)) / (D // H) ** 0.5).softmax(-1) @ v
        x = x + lin(y.transpose(1, 2).reshape(B, T, D), p + "attention.output.dense")
        m = F.layer_norm(x, (D,), sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"], cfg.ln_eps)
        x = x + lin(F.gelu(lin(m, p + "intermediate.dense")), p + "output.dense")
    x = F.layer_norm(x[:, 0], (D,), sd["vit.layernorm.weight"], sd["vit.layernorm.bias"], cfg.ln_eps)
    return lin(x, "classifier")


def test_hand_built_gpt2_checkpoint_with_fused_conv1d_c_attn(tmp_path):
    cfg = get_config("gpt2-tiny", max_positions=64)
    sd = gpt2_checkpoint(cfg)
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = build_model(cfg, seed=9, weights_path=str(tmp_path))  # a directory holding model.safetensors
    W = sd["transformer.h.1.attn.c_attn.weight"]  # [in, 3D]: columns q | k | v
    assert torch.equal(model.blocks[1].attn.k.weight, W[:, 64:128].T)
    ids = model.make_input(12, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_gpt2_forward(sd, cfg, ids), rtol=1e-4, atol=1e-5)


def test_hand_built_vit_checkpoint(tmp_path):
    cfg = get_config("vit-tiny")
    sd = vit_checkpoint(cfg)
    save_file(sd, str(tmp_path / "vit.safetensors"))
    model = build_model(cfg, weights_path=str(tmp_path / "vit.safetensors"))
    img = model.make_input(17, batch=2, seed=1)  # the trained 4x4 grid
    with torch.no_grad():
        torch.testing.assert_close(model(img), hf_vit_forward(sd, cfg, img), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vit-tiny", "gpt2-tiny"])
def test_save_load_round_trip(name, tmp_path):
    src, dst = build_model(name, seed=1), build_model(name, seed=2)
    save_hf_weights(src, tmp_path / "m.safetensors")
    load_hf_weights(dst, tmp_path / "m.safetensors")
    a, b = src.state_dict(), dst.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_strict_loading_names_the_key(tmp_path):
    cfg = get_config("gpt2-tiny", max_positions=64)
    sd = gpt2_checkpoint(cfg)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.0.mlp.c_fc.bias"}
    save_file(missing, str(tmp_path / "a.safetensors"))
    with pytest.raises(ConfigError, match="h.0.mlp.c_fc.bias"):
        build_model(cfg, weights_path=str(tmp_path / "a.safetensors"))
    save_file({**sd, "transformer.h.9.extra": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ConfigError, match="h.9.extra"):
        build_model(cfg, weights_path=str(tmp_path / "b.safetensors"))
    save_file(sd, str(tmp_path / "c.safetensors"))
    with pytest.raises(ConfigError, match="wpe.weight"):  # 64 positions in the file, 4096 in gpt2-tiny
        build_model("gpt2-tiny", weights_path=str(tmp_path / "c.safetensors"))
    with pytest.raises(ConfigError, match="vit.embeddings"):
        build_model("vit-tiny", weights_path=str(tmp_path / "c.safetensors"))
