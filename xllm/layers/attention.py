"""The attention layer: reads its KV cache and this step's metadata, runs the paged attention op."""

from __future__ import annotations

import torch
from torch import nn

from xllm.layers.forward_context import get_attn_metadata
from xllm.ops.attention import paged_attention


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # [2, num_blocks, block_size, Hkv, D]; bound by the model runner when it allocates the cache.
        self.kv_cache: torch.Tensor | None = None
        # xtensor layout: (K, V) views of the per-sequence ranges [slots, pages, block_size, Hkv, D]; else None
        self.kv_ranges: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H*D]."""
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound")
        out = paged_attention(q, k, v, self.kv_cache, get_attn_metadata(), self.scale, self.kv_ranges)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
