"""Plain-PyTorch Transformers (ViT, GPT-2, the Llama family) and the offline datasets. No knowledge of devices or networks:
the bottom layer, standing on errors only."""

from __future__ import annotations

from testbed.models.config import CONFIGS, ModelConfig, get_config
from testbed.models.hf_checkpoint import read_hf_config
from testbed.models.llama import Llama
from testbed.models.layers import Block, attend, attend_reference, causal_mask
from testbed.models.loader import load_hf_weights, save_hf_weights
from testbed.models.transformer import GPT2, ViT, TransformerModel, new_model, patch_grid


def build_model(name: str | ModelConfig, seed: int = 0, weights_path: str | None = None,
                share_weights: bool = False) -> TransformerModel:
    """A named model: deterministic random weights from ``seed``, or loaded from ``weights_path``
    (``share_weights``: parameters map the checkpoint read-only, shared between processes; see loader)."""
    model = new_model(get_config(name), seed=seed)
    if weights_path:
        load_hf_weights(model, weights_path, share=share_weights)
    return model.eval()


__all__ = ["CONFIGS", "ModelConfig", "get_config", "build_model", "new_model", "TransformerModel", "ViT", "GPT2", "Llama",
           "read_hf_config",
           "Block", "attend", "attend_reference", "causal_mask", "load_hf_weights", "save_hf_weights", "patch_grid"]
