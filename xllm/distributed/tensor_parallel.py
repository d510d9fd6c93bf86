"""A tensor-parallel group as the layers see it: this rank, the group size, its collectives.

Passed explicitly to the model (no process-wide state). Size 1 is the identity: every collective
returns its input, so a one-rank model is the plain model.

Shards: a dimension of n split over `size` ranks gives the first n % size ranks one more
(`split_counts`); attention heads are split along KV-head groups (a rank gets whole groups: its KV
heads and the query heads that read them), so 3 KV heads over 2 ranks give 2 and 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def split_counts(n: int, parts: int) -> list[int]:
    """n split over `parts` as evenly as it goes, the larger shares first."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object = None  # the torch.distributed process group (None: the default one)

    def shard(self, n: int) -> tuple[int, int]:
        """(start, count) of this rank's share of a dimension of n."""
        counts = split_counts(n, self.size)
        return sum(counts[: self.rank]), counts[self.rank]

    def head_shard(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((q start, q count), (kv start, kv count)) in heads: whole KV-head groups per rank."""
        if num_kv_heads < self.size:
            raise ValueError(
                f"tensor parallel size {self.size} is more than the model's {num_kv_heads} KV heads "
                "(each rank needs at least one KV head)"
            )
        group = num_heads // num_kv_heads
        kv_start, kv_count = self.shard(num_kv_heads)
        return (kv_start * group, kv_count * group), (kv_start, kv_count)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (x contiguous)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Concatenate the ranks' shards of the last dimension (of `total` split by `split_counts`)
        on every rank: [..., share] -> [..., total]."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        counts = split_counts(total, self.size)
        width = counts[0]
        if x.shape[-1] < width:  # pad to equal sizes for all_gather
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat([p[..., :c] for p, c in zip(parts, counts)], dim=-1)

    def argmax_last(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """The index of each row's maximum over the whole last dimension, from this rank's shard
        [N, share] of it: each rank's (max, index) pairs are gathered, not the shards. Ties go to
        the lowest index, as torch's argmax."""
        values, index = x.float().max(dim=-1)  # the first maximum of the shard
        if self.size == 1:
            return index
        import torch.distributed as dist

        start, _ = self.shard(total)
        pair = torch.stack([values.double(), (index + start).double()])  # [2, N], exact in float64
        parts = [torch.empty_like(pair) for _ in range(self.size)]
        dist.all_gather(parts, pair, group=self.group)
        pairs = torch.stack(parts)  # [size, 2, N]; ranks in vocabulary order
        best = pairs[:, 0].argmax(dim=0)  # first rank with the maximum: the lowest index
        return pairs[:, 1].gather(0, best.unsqueeze(0)).squeeze(0).long()
