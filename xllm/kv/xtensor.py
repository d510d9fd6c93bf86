"""xTensor: each sequence's KV as one contiguous virtual range over a pool of physical pages (CPU).

The physical pool is a `memfd` of `num_pages` pages. It is mapped once in full (the *physical
view*, which new K/V rows are written through, and which the lower cache tiers copy blocks from
and to). Every sequence also gets a *range*: a slot of one big `PROT_NONE` reservation, as long
as the longest sequence. When the sequence holds physical page p as its i-th page, page i of its
range is replaced by p with `mmap(MAP_SHARED | MAP_FIXED)` on the memfd; when the sequence ends,
the mapped part of the range goes back to `PROT_NONE` and the slot is reused. Both views share the
same memory: a write through one is seen through the other, and a prefix page held by several
sequences is mapped into each of their ranges.

A physical page is one KV block: `block_size` tokens of every layer, token-major, so a range is
`[max_len, num_layers, 2, Hkv, D]` and the keys of layer l are the strided tensor
`range[:, l, 0]`, one view per sequence with no block table and no gather. One page per block
keeps the mapping count low: a sequence needs (tokens / block_size) mappings at most, and runs of
consecutive physical pages are mapped with one call (one kernel mapping). The page size is
`block_size * bytes_per_token` and must be a multiple of the OS page size. Pages that are a
multiple of 2 MiB ask for huge-page backing (a hugetlb memfd when the system has huge pages
reserved, else `MADV_HUGEPAGE` on the shared memory); `huge_pages` says what was granted.

Touching a range past its mapped pages is a segmentation fault, by design: the C++ attention
kernel and the torch path only read `seq_len` tokens of each range.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import threading
import weakref

import torch

_PROT_NONE, _PROT_RW = 0x0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_SHARED, _MAP_PRIVATE, _MAP_ANONYMOUS = 0x01, 0x02, 0x20
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000
_MFD_CLOEXEC, _MFD_HUGETLB = 0x1, 0x4
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.memfd_create.argtypes = [ctypes.c_char_p, ctypes.c_uint]

MEMFD_NAME = "xllm-kv"  # shows in /proc/self/maps as "/memfd:xllm-kv (deleted)"


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    out = _libc.mmap(addr, length, prot, flags, fd, offset)
    if out in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    return out


def os_page_size() -> int:
    return mmap.PAGESIZE


def max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except OSError:
        return 65530


def pool_mappings() -> int:
    """Kernel mappings of this process that map a KV page pool (lines of /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if MEMFD_NAME in line)


def pool_huge_kib() -> int:
    """KiB of the KV page pools' mappings backed by huge pages (PMD-mapped shared memory or
    hugetlb), summed over /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = MEMFD_NAME in line
            elif inside and first in ("ShmemPmdMapped:", "FilePmdMapped:", "Shared_Hugetlb:", "Private_Hugetlb:"):
                total += int(line.split()[1])
    return total


def _tensor_at(addr: int, nbytes: int, dtype: torch.dtype, owner: object) -> torch.Tensor:
    """A tensor over raw memory [nbytes / element size] that keeps `owner` (the memory's) alive."""
    buf = (ctypes.c_char * nbytes).from_address(addr)
    buf.owner = owner  # every view of the tensor holds the buffer, the buffer holds the pool
    return torch.frombuffer(buf, dtype=dtype)


def check_page_size(block_size: int, token_bytes: int) -> int:
    """The page size for `block_size` tokens of `token_bytes`; ValueError if it is no multiple of the OS page."""
    page = block_size * token_bytes
    if page % os_page_size():
        step = os_page_size() // math.gcd(token_bytes, os_page_size())
        raise ValueError(
            f"the xtensor KV layout maps one block per page: {block_size} tokens x {token_bytes} bytes = {page} bytes, "
            f"not a multiple of the OS page size ({os_page_size()}); use a block size that is a multiple of {step}"
        )
    return page


class XTensorPool:
    """The physical page pool and the per-sequence virtual ranges over it."""

    def __init__(self, num_pages: int, page_bytes: int, range_pages: int, dtype: torch.dtype, num_slots: int = 64):
        if page_bytes % os_page_size():
            raise ValueError(f"page size {page_bytes} is not a multiple of the OS page size {os_page_size()}")
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self.range_pages = range_pages  # pages in one sequence's range (its maximum length)
        self.num_slots = num_slots
        self.dtype = dtype
        self.huge_pages = False
        self._fd = self._create_memfd(num_pages * page_bytes)
        flags = _MAP_SHARED | (0 if self.huge_pages else _MAP_NORESERVE)
        self._phys_addr = _mmap(None, num_pages * page_bytes, _PROT_RW, flags, self._fd)
        if page_bytes % _HUGE_PAGE == 0 and not self.huge_pages:
            self.huge_pages = _libc.madvise(self._phys_addr, num_pages * page_bytes, _MADV_HUGEPAGE) == 0 and _shmem_thp()
        self.slot_bytes = range_pages * page_bytes
        self._reserve_bytes = num_slots * self.slot_bytes
        # Huge pages map only at 2 MiB-aligned addresses: reserve 2 MiB more and start the ranges aligned.
        align = _HUGE_PAGE if page_bytes % _HUGE_PAGE == 0 else 1
        self._region = (_mmap(None, self._reserve_bytes + align - 1, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE),
                        self._reserve_bytes + align - 1)
        self._base = -(-self._region[0] // align) * align
        # Unmapped and closed when the pool and every tensor over it are gone (or by `close`).
        self._finalizer = weakref.finalize(
            self, _unmap_all, self._fd, [self._region, (self._phys_addr, num_pages * page_bytes)]
        )
        self._mapped: list[list[int]] = [[] for _ in range(num_slots)]  # per slot: physical page of each range page
        self._slot_of: dict[str, int] = {}
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._lock = threading.Lock()
        self.map_calls = 0

    def _create_memfd(self, nbytes: int) -> int:
        if self.page_bytes % _HUGE_PAGE == 0 and _hugetlb_free_pages() * _HUGE_PAGE >= nbytes:
            try:
                fd = _memfd(_MFD_CLOEXEC | _MFD_HUGETLB)
                os.ftruncate(fd, nbytes)
                self.huge_pages = True
                return fd
            except OSError:
                pass
        fd = _memfd(_MFD_CLOEXEC)
        os.ftruncate(fd, nbytes)
        return fd

    # Tensors over the pool: each keeps the pool alive; the pool keeps none (no reference cycle).
    def physical(self) -> torch.Tensor:
        """The physical view, flat: page p is elements [p * page_elems, (p + 1) * page_elems). Zero-filled at start."""
        return _tensor_at(self._phys_addr, self.num_pages * self.page_bytes, self.dtype, self)

    def ranges(self) -> torch.Tensor:
        """All slots' ranges, flat, slot after slot; only mapped pages may be touched."""
        return _tensor_at(self._base, self._reserve_bytes, self.dtype, self)

    # ---- sequences ------------------------------------------------------------------------------
    def slot(self, seq_id: str) -> int:
        """The slot (range) of `seq_id`, taking a free one for a new sequence."""
        with self._lock:
            s = self._slot_of.get(seq_id)
            if s is None:
                if not self._free_slots:
                    raise RuntimeError(f"all {self.num_slots} xtensor ranges are in use")
                s = self._slot_of[seq_id] = self._free_slots.pop()
            return s

    def has(self, seq_id: str) -> bool:
        return seq_id in self._slot_of

    def map_pages(self, seq_id: str, pages: list[int]) -> int:
        """Make `seq_id`'s range map `pages` (its block ids, in order) and return its slot. Pages
        already mapped as asked are kept; from the first difference on, pages are (re)mapped, a run
        of consecutive physical pages with one call; range pages past `pages` are left as they are."""
        if len(pages) > self.range_pages:
            raise ValueError(f"{len(pages)} pages exceed the range of {self.range_pages}")
        s = self.slot(seq_id)
        mapped = self._mapped[s]
        i = 0
        while i < len(mapped) and i < len(pages) and mapped[i] == pages[i]:
            i += 1
        if i == len(pages):
            return s
        base = self._base + s * self.slot_bytes
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            if not (0 <= pages[i] and pages[j - 1] < self.num_pages):
                raise ValueError(f"page id out of range 0..{self.num_pages - 1}")
            _mmap(
                base + i * self.page_bytes, (j - i) * self.page_bytes, _PROT_RW, _MAP_SHARED | _MAP_FIXED, self._fd,
                pages[i] * self.page_bytes,
            )
            self.map_calls += 1
            i = j
        if len(mapped) > len(pages):
            mapped[: len(pages)] = pages
        else:
            mapped[:] = pages
        return s

    def release(self, seq_id: str) -> None:
        """Unmap `seq_id`'s range (back to PROT_NONE) and free its slot; the pages stay in the pool."""
        with self._lock:
            s = self._slot_of.pop(seq_id, None)
            if s is None:
                return
            if self._mapped[s]:
                _mmap(
                    self._base + s * self.slot_bytes, len(self._mapped[s]) * self.page_bytes, _PROT_NONE,
                    _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE,
                )
                self._mapped[s] = []
            self._free_slots.append(s)

    def num_mapped(self, seq_id: str) -> int:
        s = self._slot_of.get(seq_id)
        return 0 if s is None else len(self._mapped[s])

    def mapped_pages(self, seq_id: str) -> list[int]:
        s = self._slot_of.get(seq_id)
        return [] if s is None else list(self._mapped[s])

    @property
    def num_active(self) -> int:
        return len(self._slot_of)

    def check_invariants(self) -> None:
        """For tests: slots are held or free, never both; free slots map nothing."""
        held = set(self._slot_of.values())
        assert len(held) == len(self._slot_of) and not held & set(self._free_slots)
        assert held | set(self._free_slots) == set(range(self.num_slots))
        assert all(not self._mapped[s] for s in self._free_slots)
        assert all(0 <= p < self.num_pages for m in self._mapped for p in m)

    def close(self) -> None:
        """Unmap everything and close the pool now (tensors over it must not be used afterwards)."""
        self._finalizer()


def _unmap_all(fd: int, regions: list[tuple[int, int]]) -> None:
    for addr, length in regions:
        _libc.munmap(addr, length)
    os.close(fd)


def _memfd(flags: int) -> int:
    fd = _libc.memfd_create(MEMFD_NAME.encode(), flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"memfd_create failed: {os.strerror(err)}")
    return fd


def _hugetlb_free_pages() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _shmem_thp() -> bool:
    """Whether shared memory may get transparent huge pages when asked (madvise)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            setting = f.read()
    except OSError:
        return False
    return any(f"[{mode}]" in setting for mode in ("always", "within_size", "advise", "force"))
