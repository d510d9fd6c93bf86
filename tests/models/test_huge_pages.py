"""Weights moved onto transparent huge pages: same values, same outputs, tied weights still tied."""

from __future__ import annotations

import pytest
import torch

from xllm.models.huge_pages import HUGE_PAGE, huge_page_kib, thp_mode, to_huge_pages

needs_thp = pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 64)
        self.proj = torch.nn.Linear(64, 3000)
        self.head = torch.nn.Linear(64, 1000, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("table", torch.randn(4096))
        self.packed = torch.randn(3000, 64)  # a plain tensor attribute, like a prepacked copy
        self.small = torch.randn(8)  # under the size floor: stays

    def forward(self, ids):
        x = self.embed(ids)
        return self.proj(x).sum(-1) + self.head(x).sum(-1) + self.table[: ids.numel()].view(ids.shape)


def inside(t: torch.Tensor, arena) -> bool:
    return arena.address <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= arena.address + arena.nbytes


@needs_thp
def test_tensors_move_into_one_aligned_arena_and_compute_the_same():
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.tensor([[1, 2, 3], [4, 5, 999]])
    before = model(ids)
    packed = model.packed.clone()
    weight_param = model.proj.weight
    arena = to_huge_pages(model)
    assert arena is not None and arena.address % HUGE_PAGE == 0
    assert all(inside(t, arena) for t in (model.embed.weight, model.proj.weight, model.proj.bias, model.table, model.packed))
    assert not inside(model.small, arena)
    assert model.head.weight is model.embed.weight  # still tied: one copy
    assert model.proj.weight is weight_param and isinstance(model.proj.weight, torch.nn.Parameter)
    assert torch.equal(model.packed, packed)
    assert torch.equal(model(ids), before)
    assert 0 <= huge_page_kib(arena) <= arena.nbytes // 1024 + 2048


@needs_thp
def test_a_large_arena_gets_huge_pages():
    """What the kernel grants is its choice; with THP in madvise mode it grants a 64 MiB arena
    huge pages on these machines (if this fails, check /sys/kernel/mm/transparent_hugepage)."""
    model = torch.nn.Linear(4096, 4096, bias=False)
    arena = to_huge_pages(model)
    assert huge_page_kib(arena) >= 32 * 1024
