"""RMSNorm, with the residual add fused in (as the decoder layers use it)."""

from __future__ import annotations

import torch
from torch import nn

from xllm.ops import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [..., hidden]. With `residual`, normalizes x + residual and also returns that sum."""
        fused = cpu_kernels.rms_norm(x, residual, self.weight, self.eps)
        if fused is not None:
            return fused[0] if residual is None else fused
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        # Same operation order as transformers' LlamaRMSNorm, so float32 results match closely.
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
