"""Linear and embedding layers whose parameters start uninitialized (weights are always loaded).

`MergedLinear` holds several projections stacked along the output dimension (q/k/v, gate/up) so
one matmul computes them all; `load_shard` copies one named part into its rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm.ops import cpu_kernels


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy of the weight (`prepack`)

    def prepack(self) -> None:
        """Keep a oneDNN-blocked float32 copy of the (loaded) weight where `cpu_kernels.prepack` gives one."""
        self.packed = cpu_kernels.prepack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.weight, self.bias, self.packed)


class MergedLinear(Linear):
    def __init__(self, in_features: int, part_sizes: dict[str, int], bias: bool = False, dtype=torch.float32):
        super().__init__(in_features, sum(part_sizes.values()), bias, dtype)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in part_sizes.items():
            self.offsets[name] = (start, size)
            start += size

    def load_shard(self, part: str, param_name: str, tensor: torch.Tensor) -> None:
        start, size = self.offsets[part]
        target = getattr(self, param_name)
        if tensor.shape[0] != size or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(f"{part}.{param_name}: expected {(size, *target.shape[1:])}, got {tuple(tensor.shape)}")
        target.data[start : start + size].copy_(tensor)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split([size for _, size in self.offsets.values()], dim=-1))


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
