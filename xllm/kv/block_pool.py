"""The pool of KV blocks: reference counts, an LRU free list, and the prefix-cache index.

A block is `block_size` token slots in every layer's KV cache. Reference counts let several
requests hold the same block (prefix sharing, cache hits); a block returns to the free list when
its count drops to zero. With caching on, a full block keeps its hash when freed: it stays in the
index (`cached`: hash -> block) and can be taken back by a later request with the same prefix
until it is evicted, which happens only when `allocate` reuses it. The free list is ordered
least recently freed first, so allocation evicts the coldest cached blocks first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.num_evictions = 0  # cached blocks reused for other content
        # Called with (block, hash) just before a cached block is reused, while it still holds the
        # content: the lower cache tiers save it (kv/tiers/, a KV connector).
        self.on_evict: Callable[[int, bytes], None] | None = None

    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached ones included: they are evictable)."""
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """n blocks with reference count 1, coldest first; raises if fewer are free (callers check first)."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def allocate_one(self, avoid: set[int] | frozenset[int] = frozenset()) -> int | None:
        """The coldest free block not in `avoid`, with reference count 1; None if there is none."""
        b = next((b for b in self._free if b not in avoid), None)
        if b is None:
            return None
        del self._free[b]
        self._evict(b)
        self.ref_counts[b] = 1
        return b

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self.on_evict is not None:
                self.on_evict(b, h)
            self.block_hash[b] = None
            if self.cached.get(h) == b:
                del self.cached[h]
            self.num_evictions += 1

    def incref(self, blocks: list[int]) -> None:
        """Share blocks that are held already (n > 1 samples of one prompt)."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise ValueError(f"block {b} is free; cannot share it")
            self.ref_counts[b] += 1

    def touch(self, blocks: list[int]) -> None:
        """Take a reference to cache hits, held or free (a free one leaves the free list)."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; those that reach zero join the free list's hot end in
        the order given (pass a request's blocks tail first, so its tail is evicted before its head)."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None
                if not self.enable_caching:
                    self.block_hash[b] = None

    # ---- the prefix-cache index -------------------------------------------------------------
    def cache_block(self, b: int, block_hash: bytes) -> None:
        """Record that held block b is full with the content `block_hash` names. A block whose hash
        is already cached elsewhere (computed twice concurrently) stays out of the index."""
        if not self.enable_caching or self.block_hash[b] is not None:
            return
        if block_hash not in self.cached:
            self.cached[block_hash] = b
            self.block_hash[b] = block_hash

    def uncache_block(self, b: int) -> None:
        """Take block b out of the index (its content is not what its hash says)."""
        h = self.block_hash[b]
        if h is not None:
            self.block_hash[b] = None
            if self.cached.get(h) == b:
                del self.cached[h]

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of this hash chain."""
        blocks = []
        if self.enable_caching:
            for h in hashes:
                b = self.cached.get(h)
                if b is None:
                    break
                blocks.append(b)
        return blocks

    def num_free_among(self, blocks: list[int]) -> int:
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    def check_invariants(self) -> None:
        """For tests: the free list, reference counts and the index agree."""
        free = set(self._free)
        assert len(free) == len(self._free)
        for b in range(self.num_blocks):
            assert self.ref_counts[b] >= 0
            assert (self.ref_counts[b] == 0) == (b in free), f"block {b}: ref {self.ref_counts[b]}, free {b in free}"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
        assert sum(h is not None for h in self.block_hash) == len(self.cached)
