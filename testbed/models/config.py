"""Model configurations. One typed dataclass per model; named configs for users and tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

from testbed.errors import ConfigError, check

KINDS = ("vit", "gpt2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    kind: str  # "vit" (bidirectional, CLS token), "gpt2" or "llama" (causal LMs)
    dim: int  # D, hidden size
    n_layers: int  # L, blocks
    n_heads: int  # H
    mlp_dim: int  # hidden width of the MLP
    ln_eps: float = 1e-5
    # ViT
    patch_size: int = 16
    image_size: int = 224  # the grid the position embeddings were trained for (image_size/patch_size)^2
    n_classes: int = 1000
    channels: int = 3
    # GPT-2
    vocab_size: int = 50257
    max_positions: int = 1024
    # Llama family (RMSNorm, rotary positions, grouped-query attention, SwiGLU); ln_eps is RMSNorm's eps
    n_kv_heads: int | None = None  # None: n_heads (multi-head attention)
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # HF's rope_scaling as sorted (key, value) pairs: () | linear | llama3
    tie_embeddings: bool = True  # lm_head shares the token embedding
    qkv_bias: bool = False  # Qwen2 carries biases on q/k/v

    def __post_init__(self) -> None:
        check(self.kind in KINDS, "kind", self.kind, " | ".join(KINDS))
        for name in ("dim", "n_layers", "n_heads", "mlp_dim"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        check(self.dim % self.n_heads == 0, "n_heads", self.n_heads, f"a divisor of dim={self.dim}")
        kv = self.kv_heads
        check(isinstance(kv, int) and kv >= 1 and self.n_heads % kv == 0, "n_kv_heads", self.n_kv_heads,
              f"a positive divisor of n_heads={self.n_heads}")
        check(kv == self.n_heads or self.kind == "llama", "n_kv_heads", self.n_kv_heads, "None unless kind is 'llama'")
        scaling = dict(self.rope_scaling)
        check(scaling.get("rope_type") in (None, "linear", "llama3") if scaling else True, "rope_scaling",
              scaling, "none, {rope_type: linear, factor} or {rope_type: llama3, factor, low_freq_factor, "
              "high_freq_factor, original_max_position_embeddings}")

    @property
    def kv_heads(self) -> int:
        """KV heads: n_kv_heads, or n_heads without grouped-query attention."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def causal(self) -> bool:
        return self.kind in ("gpt2", "llama")

    def output_index(self, T: int) -> int:
        """The token whose final hidden state the head reads: CLS (0) for ViT, the last prompt token for LMs."""
        return T - 1 if self.causal else 0


CONFIGS: dict[str, ModelConfig] = {
    # tiny models for tests: a few blocks, small width, any token count
    "vit-tiny": ModelConfig("vit", dim=64, n_layers=2, n_heads=4, mlp_dim=128, ln_eps=1e-12,
                            patch_size=4, image_size=16, n_classes=10),
    "vit-small": ModelConfig("vit", dim=384, n_layers=12, n_heads=6, mlp_dim=1536, ln_eps=1e-12),
    "vit-base": ModelConfig("vit", dim=768, n_layers=12, n_heads=12, mlp_dim=3072, ln_eps=1e-12),
    # for the accuracy study (testbed.train): 32x32 upsampled digits, 4x4 patches -> 64 patches + CLS;
    # D=128 so that G in {1, 4, 16, 32} all divide it
    "vit-digits": ModelConfig("vit", dim=128, n_layers=4, n_heads=4, mlp_dim=256, ln_eps=1e-12,
                              patch_size=4, image_size=32, n_classes=10, channels=1),
    "gpt2-tiny": ModelConfig("gpt2", dim=64, n_layers=2, n_heads=4, mlp_dim=256, vocab_size=256, max_positions=4096),
    "gpt2-small": ModelConfig("gpt2", dim=768, n_layers=12, n_heads=12, mlp_dim=3072),
    "gpt2-medium": ModelConfig("gpt2", dim=1024, n_layers=24, n_heads=16, mlp_dim=4096),
    # Llama family: a tiny one for tests (GQA, 2 query heads per KV head, llama3 rope scaling), then the
    # shapes of public checkpoints (random weights unless weights_path points at the checkpoint)
    "llama-tiny": ModelConfig("llama", dim=96, n_layers=2, n_heads=12, mlp_dim=160, ln_eps=1e-5, vocab_size=256,
                              max_positions=4096, n_kv_heads=6, rope_theta=10000.0, tie_embeddings=False,
                              rope_scaling=(("factor", 4.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                            ("original_max_position_embeddings", 64), ("rope_type", "llama3"))),
    "smollm2-135m": ModelConfig("llama", dim=576, n_layers=30, n_heads=9, mlp_dim=1536, ln_eps=1e-5,
                                vocab_size=49152, max_positions=8192, n_kv_heads=3, rope_theta=100000.0),
    "qwen2.5-0.5b": ModelConfig("llama", dim=896, n_layers=24, n_heads=14, mlp_dim=4864, ln_eps=1e-6,
                                vocab_size=151936, max_positions=32768, n_kv_heads=2, rope_theta=1000000.0,
                                qkv_bias=True),
    "llama-3.2-1b": ModelConfig("llama", dim=2048, n_layers=16, n_heads=32, mlp_dim=8192, ln_eps=1e-5,
                                vocab_size=128256, max_positions=131072, n_kv_heads=8, rope_theta=500000.0,
                                rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                              ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))),
    # for the simulator: 8B parameters do not fit four times in this machine's memory
    "llama-3-8b": ModelConfig("llama", dim=4096, n_layers=32, n_heads=32, mlp_dim=14336, ln_eps=1e-5,
                              vocab_size=128256, max_positions=8192, n_kv_heads=8, rope_theta=500000.0,
                              tie_embeddings=False),
    # what this host measures for it (testbed.sim.proxy): four of its blocks, exactly as wide, and a cut
    # vocabulary (the head reads one token): 0.94 B parameters, 3.8 GB in fp32 against the 8B's 32 GB
    "llama-3-8b-4l": ModelConfig("llama", dim=4096, n_layers=4, n_heads=32, mlp_dim=14336, ln_eps=1e-5,
                                 vocab_size=8192, max_positions=8192, n_kv_heads=8, rope_theta=500000.0,
                                 tie_embeddings=False),
}


def get_config(name: str | ModelConfig, **overrides) -> ModelConfig:
    """A named config (optionally with fields replaced), or the config itself."""
    if isinstance(name, ModelConfig):
        cfg = name
    elif name in CONFIGS:
        cfg = CONFIGS[name]
    else:
        raise ConfigError("model", name, ", ".join(CONFIGS) + " (or a local weights path with `weights_path`)")
    return replace(cfg, **overrides) if overrides else cfg
