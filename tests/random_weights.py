"""Random-weight checkpoints for the oracle tests: a transformers model saved as safetensors."""

from __future__ import annotations

import torch


def save_checkpoint(model, folder, qkv_bias_std: float | None = None) -> str:
    """Save `model` (a transformers causal LM) to `folder`. transformers starts q/k/v biases at
    zero; with `qkv_bias_std` (Qwen2) they are drawn from N(0, std) first, so they count."""
    if qkv_bias_std is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, qkv_bias_std)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)
