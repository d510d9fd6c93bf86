"""Model weights on transparent huge pages.

A decode step streams every weight once. On these KVM guests reads through ordinary 4 KiB pages
reach about two thirds of the bandwidth that 2 MiB pages give (nested paging: every TLB miss walks
two page tables). `to_huge_pages` copies every tensor a model holds (parameters, buffers, and
tensor attributes such as the prepacked weight copies) into one anonymous mapping advised
`MADV_HUGEPAGE`, 2 MiB aligned, and points the model's tensors at the copies (`.data`, so every
reference to a tensor, tied weights included, follows). Where transparent huge pages are off
("never") or `madvise` is missing, it leaves the model as it is.

`huge_page_kib` reads back from `/proc/self/smaps` how much of the mapping the kernel backed with
huge pages (`AnonHugePages`).
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode for anonymous memory ("always", "madvise", "never")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


@dataclass
class HugePageArena:
    """The mapping that holds a model's tensors; the model's tensors keep it alive."""

    mapping: mmap.mmap
    address: int  # first byte of the 2 MiB-aligned area
    nbytes: int  # bytes of tensors placed


def _model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every distinct tensor object the model's modules hold, parameters first."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    for module in model.modules():
        candidates = list(module._parameters.values()) + list(module._buffers.values())
        candidates += [v for k, v in vars(module).items() if isinstance(v, torch.Tensor) and not k.startswith("_")]
        for t in candidates:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                found.append(t)
    return found


def to_huge_pages(model: torch.nn.Module, min_bytes: int = 4096) -> HugePageArena | None:
    """Move the model's contiguous CPU tensors of at least `min_bytes` onto huge pages; None when
    the system gives no way to ask for them. Call it after loading and prepacking, before the
    KV cache is bound (the cache is not the model's to move)."""
    if thp_mode() not in ("always", "madvise") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    tensors = [
        t for t in _model_tensors(model)
        if t.device.type == "cpu" and t.is_contiguous() and not t.is_mkldnn and t.numel() * t.element_size() >= min_bytes
    ]
    # One placement per storage: views of one storage (a tied weight seen twice) move together.
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    groups = [g for g in by_storage.values() if all(t.storage_offset() == 0 and t.data_ptr() == g[0].data_ptr() for t in g)]
    total = sum(-(-g[0].untyped_storage().nbytes() // _ALIGN) * _ALIGN for g in groups)
    if not total:
        return None
    mapping = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    mapping.madvise(mmap.MADV_HUGEPAGE, start, total)
    offset = start
    with torch.no_grad():
        for g in groups:
            nbytes = g[0].untyped_storage().nbytes()
            area = raw[offset : offset + nbytes]
            area.copy_(_as_bytes(g[0], nbytes))
            for t in g:
                t.data = area.view(t.dtype)[: t.numel()].view(t.shape)
            offset += -(-nbytes // _ALIGN) * _ALIGN
    return HugePageArena(mapping, raw.data_ptr() + start, total)


def _as_bytes(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The bytes of `t`'s whole storage, as a uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), 0, (nbytes,))


def huge_page_kib(arena: HugePageArena) -> int:
    """KiB of the arena the kernel backs with huge pages (`AnonHugePages` of its mapping in smaps)."""
    lo, hi = arena.address, arena.address + arena.nbytes
    kib = 0
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    a, b = (int(x, 16) for x in head.split("-"))
                    inside = a < hi and b > lo
                elif inside and head == "AnonHugePages:":
                    kib += int(line.split()[1])
    except OSError:
        return 0
    return kib
