"""Plain-PyTorch Transformers (ViT, GPT-2) and the offline datasets. No knowledge of devices or networks:
the bottom layer, standing on errors only."""

from __future__ import annotations

from testbed.models.config import CONFIGS, ModelConfig, get_config
from testbed.models.layers import Block, attend, attend_reference, causal_mask
from testbed.models.loader import load_hf_weights, save_hf_weights
from testbed.models.transformer import GPT2, ViT, TransformerModel, new_model, patch_grid


def build_model(name: str | ModelConfig, seed: int = 0, weights_path: str | None = None) -> TransformerModel:
    """A named model: deterministic random weights from ``seed``, or loaded from ``weights_path``."""
    model = new_model(get_config(name), seed=seed)
    if weights_path:
        load_hf_weights(model, weights_path)
    return model.eval()


__all__ = ["CONFIGS", "ModelConfig", "get_config", "build_model", "new_model", "TransformerModel", "ViT", "GPT2",
           "Block", "attend", "attend_reference", "causal_mask", "load_hf_weights", "save_hf_weights", "patch_grid"]
