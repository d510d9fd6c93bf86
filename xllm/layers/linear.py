"""Linear and embedding layers whose parameters start uninitialized (weights are always loaded).

`MergedLinear` holds several projections stacked along the output dimension (q/k/v, gate/up) so
one matmul computes them all; `load_shard` copies one named part into its rows.

Tensor parallelism is a shard spec on the layer, and each parameter is loaded through the layer,
which takes its shard of the checkpoint's tensor:
- column-parallel (`rows`, or per-part row starts for a merged layer): this rank holds a slice of
  the output rows (its heads, its share of the MLP's intermediate dimension); no communication;
- row-parallel (`cols`): a slice of the input columns; its output is a partial sum the model
  all-reduces (the layer does not, so the fused decode kernels can split at the same points);
- vocab-parallel (`Embedding(..., shard=)`): a slice of the vocabulary's rows; ids outside it
  embed to zero and the ranks' embeddings are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm.ops import cpu_kernels


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape:
        raise ValueError(f"{name}: expected {tuple(want.shape)}, got {tuple(got.shape)}")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        """rows / cols: (start, count) of this rank's shard of the checkpoint's [out, in] weight
        (column- / row-parallel); None: the whole dimension."""
        super().__init__()
        if cols is not None and bias:
            raise ValueError("a row-parallel linear layer with a bias is not supported")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.rows, self.cols = rows, cols
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy of the weight (`prepack`)

    def load_weight(self, param_name: str, tensor: torch.Tensor) -> None:
        """Copy this rank's shard of a checkpoint tensor into `param_name` ("weight" or "bias")."""
        if self.rows is not None:
            tensor = tensor.narrow(0, *self.rows)
        if self.cols is not None and param_name == "weight":
            tensor = tensor.narrow(1, *self.cols)
        target = getattr(self, param_name)
        _check(param_name, tensor, target)
        target.data.copy_(tensor)

    def prepack(self) -> None:
        """Keep a oneDNN-blocked float32 copy of the (loaded) weight where `cpu_kernels.prepack` gives one."""
        self.packed = cpu_kernels.prepack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.weight, self.bias, self.packed)


class MergedLinear(Linear):
    def __init__(self, in_features: int, part_sizes: dict[str, int], bias: bool = False, dtype=torch.float32,
                 part_starts: dict[str, int] | None = None):
        """part_sizes: each part's rows on this rank; part_starts: where they start in the part's
        checkpoint tensor (column-parallel; None: each part whole)."""
        super().__init__(in_features, sum(part_sizes.values()), bias, dtype)
        self.offsets: dict[str, tuple[int, int]] = {}
        self.part_starts = part_starts
        start = 0
        for name, size in part_sizes.items():
            self.offsets[name] = (start, size)
            start += size

    def load_shard(self, part: str, param_name: str, tensor: torch.Tensor) -> None:
        start, size = self.offsets[part]
        target = getattr(self, param_name)
        if self.part_starts is not None:
            tensor = tensor.narrow(0, self.part_starts[part], size)
        _check(f"{part}.{param_name}", tensor, target.data[start : start + size])
        target.data[start : start + size].copy_(tensor)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split([size for _, size in self.offsets.values()], dim=-1))


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype = torch.float32,
                 shard: tuple[int, int] | None = None, tp=None):
        """shard: (start, count) of this rank's vocabulary rows (vocab-parallel, summed over `tp`)."""
        super().__init__()
        self.shard, self.tp = shard, tp
        rows = shard[1] if shard is not None else num_embeddings
        self.weight = nn.Parameter(torch.empty(rows, dim, dtype=dtype), requires_grad=False)

    def load_weight(self, param_name: str, tensor: torch.Tensor) -> None:
        if self.shard is not None:
            tensor = tensor.narrow(0, *self.shard)
        _check(param_name, tensor, self.weight)
        self.weight.data.copy_(tensor)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return F.embedding(ids, self.weight)
        start, count = self.shard
        local = ids - start
        inside = (local >= 0) & (local < count)
        x = F.embedding(local.clamp(0, count - 1), self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(x)
