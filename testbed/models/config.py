"""Model configurations. One typed dataclass per model; named configs for users and tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

from testbed.errors import ConfigError, check


@dataclass(frozen=True)
class ModelConfig:
    kind: str  # "vit" (bidirectional, CLS token) or "gpt2" (causal LM)
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

    def __post_init__(self) -> None:
        check(self.kind in ("vit", "gpt2"), "kind", self.kind, "'vit' or 'gpt2'")
        for name in ("dim", "n_layers", "n_heads", "mlp_dim"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        check(self.dim % self.n_heads == 0, "n_heads", self.n_heads, f"a divisor of dim={self.dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def causal(self) -> bool:
        return self.kind == "gpt2"

    def output_index(self, T: int) -> int:
        """The token whose final hidden state the head reads: CLS (0) for ViT, the last prompt token for GPT-2."""
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
