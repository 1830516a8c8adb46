"""Models: shapes, named configs, determinism from a seed, the pieces methods rely on, bad names."""

from __future__ import annotations

import pytest
import torch

from testbed.errors import ConfigError
from testbed.models import CONFIGS, attend, attend_reference, build_model, causal_mask, get_config, patch_grid


@pytest.mark.parametrize("tokens,image", [(17, (16, 16)), (11, (8, 20)), (2, (4, 4))])
def test_vit_input_gives_the_requested_token_count(tokens, image):
    model = build_model("vit-tiny")
    inp = model.make_input(tokens, batch=2)
    assert inp.shape == (2, 3, *image)
    assert model.embed(inp).shape == (2, tokens, 64)
    assert model(inp).shape == (2, 10)


def test_gpt2_shapes():
    model = build_model("gpt2-tiny")
    ids = model.make_input(9, batch=3)
    assert ids.shape == (3, 9) and ids.dtype == torch.int64 and int(ids.max()) < 256
    assert model.embed(ids).shape == (3, 9, 64)
    assert model(ids).shape == (3, 256)
    assert model.output_index(9) == 8 and build_model("vit-tiny").output_index(9) == 0


def test_named_configs():
    assert {"vit-tiny", "vit-base", "gpt2-tiny", "gpt2-small", "gpt2-medium"} <= set(CONFIGS)
    base = get_config("vit-base")
    assert (base.dim, base.n_layers, base.n_heads, base.mlp_dim) == (768, 12, 12, 3072)
    med = get_config("gpt2-medium")
    assert (med.dim, med.n_layers, med.n_heads, med.causal) == (1024, 24, 16, True)
    assert patch_grid(196) == (14, 14) and patch_grid(1023) == (31, 33)


def test_weights_and_inputs_are_deterministic_from_the_seed():
    a, b, c = build_model("gpt2-tiny", seed=0), build_model("gpt2-tiny", seed=0), build_model("gpt2-tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.q.weight"], sc["blocks.0.attn.q.weight"])
    assert torch.equal(a.make_input(7, seed=3), a.make_input(7, seed=3))
    assert not torch.equal(a.make_input(7, seed=3), a.make_input(7, seed=4))
    torch.manual_seed(123)
    x = torch.rand(1)
    torch.manual_seed(123)
    build_model("vit-tiny", seed=5)
    assert torch.equal(torch.rand(1), x)  # building a model leaves the global RNG alone


def test_bad_names_and_inputs():
    with pytest.raises(ConfigError) as e:
        build_model("vit-huge")
    assert e.value.field == "model" and "vit-tiny" in e.value.allowed
    with pytest.raises(ConfigError, match="tokens"):
        build_model("vit-tiny").make_input(1)
    with pytest.raises(ConfigError, match="tokens"):
        build_model("gpt2-tiny").make_input(5000)
    with pytest.raises(ConfigError, match="n_heads"):
        get_config("vit-tiny", n_heads=5)
    with pytest.raises(ConfigError, match="weights_path"):
        build_model("vit-tiny", weights_path="/nonexistent/model.safetensors")


def test_gpt2_embeds_positions_globally_and_is_causal():
    model = build_model("gpt2-tiny")
    ids = model.make_input(10, seed=1)
    torch.testing.assert_close(model.embed_positions(ids[:, 4:7], 4), model.embed(ids)[:, 4:7])
    # the logits of the prefix's last token do not depend on later tokens
    x = model.embed(ids)
    mask = causal_mask(torch.arange(10), torch.arange(10))
    with torch.no_grad():
        for blk in model.blocks:
            x = blk(x, mask)
        torch.testing.assert_close(model(ids[:, :6]), model.output(x[:, 5]), rtol=1e-5, atol=1e-5)


def test_vit_embed_is_cls_then_patches():
    model = build_model("vit-tiny")
    img = model.make_input(17)
    emb = model.embed(img)
    torch.testing.assert_close(emb[:, :1], model.cls_embedding())
    torch.testing.assert_close(emb[:, 1:], model.embed_patches(img))


def test_vit_position_embeddings_resize_to_other_grids():
    model = build_model("vit-tiny")  # trained grid 4x4
    pe = model.pos_embedding(3, 5)
    assert pe.shape == (1, 16, 64)
    torch.testing.assert_close(pe[:, :1], model.pos[:, :1])
    assert torch.equal(model.pos_embedding(4, 4), model.pos)


@pytest.mark.parametrize("heads", [4, 1])
def test_fused_attention_matches_the_reference_path_for_any_head_subset(heads):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, heads * 8, generator=g) for _ in range(3))
    k, v = torch.cat([k, k[:, :2]], 1), torch.cat([v, v[:, :2]], 1)  # 7 keys for 5 queries
    mask = causal_mask(torch.arange(2, 7), torch.arange(7))
    for m in (None, mask):
        torch.testing.assert_close(attend(q, k, v, 8, m), attend_reference(q, k, v, 8, m), rtol=1e-5, atol=1e-6)


def test_models_built_in_parallel_threads_get_identical_weights():
    """In-process ranks build their models concurrently; the seed alone must fix the weights."""
    import threading

    from testbed.models import build_model

    out: list = [None] * 4

    def build(i: int) -> None:
        out[i] = build_model("vit-tiny", seed=1).state_dict()

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(out[0][k], o[k]) for o in out[1:] for k in out[0])
