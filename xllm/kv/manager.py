"""The KV cache manager: which blocks each request holds, and the prefix cache over them.

The scheduler asks it for room (`allocate_slots`) and gets back yes or no; it asks for a request's
block ids when it hands the step to the runner, and frees a request's blocks when it finishes or
is preempted. It never exposes the pool's internals to the scheduler.

Prefix caching (on by default): once a block of a request is full and computed, `cache_computed`
files it under the hash of its tokens chained on all earlier ones (`block_hash.py`); a new request
asks `find_cached_prefix` for the longest chain of its full blocks already in the cache, gets those
blocks shared (reference-counted, read-only: nobody writes below its computed length) and computes
only the rest. At least one token is always computed, so the last position's logits exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xllm.kv.block_hash import extend_hashes
from xllm.kv.block_pool import BlockPool

if TYPE_CHECKING:
    from xllm.kv.tiers import KVTiers


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, tiers: KVTiers | None = None):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.tiers = tiers if enable_caching else None
        if self.tiers is not None:
            self.pool.on_evict = self.tiers.demote
        self._blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # per request: hashes of its full blocks so far
        self._num_cached: dict[str, int] = {}  # per request: leading blocks already filed in the index
        self.loads_pending = False  # the last lookup found its chain still being read from disk
        self._freed: list[str] = []  # requests whose blocks were freed since the last `take_freed`
        # Running requests also get the block their next token will need, when blocks are plentiful
        # (the xtensor runner maps it ahead, off the critical path); set by the engine.
        self.lookahead = False
        # Blocks the step now computing writes (set by the engine while it schedules the next step
        # meanwhile): promotions from the lower tiers, the only writes outside a forward pass, keep
        # out of them, since a request may free its blocks while its step is still running.
        self.busy_blocks: frozenset[int] = frozenset()
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found in the cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.pool.num_blocks

    def allocate_slots(self, request_id: str, total_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make the request hold enough blocks for `total_tokens` tokens, starting with `cached_blocks`
        (prefix-cache hits, only for a request that holds nothing yet); False and no change if short."""
        held = self._blocks.get(request_id, [])
        cached_blocks = cached_blocks or []
        if cached_blocks and held:
            raise ValueError(f"request {request_id!r} already holds blocks")
        extra = self.blocks_needed(total_tokens) - len(held) - len(cached_blocks)
        # Hits that sit in the free list stop being free when taken.
        if max(extra, 0) > self.pool.num_free - self.pool.num_free_among(cached_blocks):
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            held = list(cached_blocks)
            self._num_cached[request_id] = len(cached_blocks)
        if extra > 0:
            held = held + self.pool.allocate(extra)
        self._blocks[request_id] = held
        return True

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def free(self, request_id: str) -> None:
        blocks = self._blocks.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if blocks is not None:
            self._freed.append(request_id)
        if blocks:
            self.pool.free(blocks[::-1])  # tail first: evicted before the (more shareable) head

    def take_freed(self) -> list[str]:
        """Request ids freed since the last call (the runner drops their per-request KV state, e.g. xtensor ranges)."""
        freed, self._freed = self._freed, []
        return freed

    def usage(self) -> float:
        return self.pool.usage()

    # ---- prefix caching -----------------------------------------------------------------------
    def _request_hashes(self, request_id: str, token_ids: list[int], num_blocks: int, cache_salt: str | None) -> list[bytes]:
        hashes = self._hashes.setdefault(request_id, [])
        if len(hashes) < num_blocks:
            extend_hashes(hashes, token_ids, self.block_size, num_blocks, cache_salt)
        return hashes

    def find_cached_prefix(
        self, request_id: str, token_ids: list[int], cache_salt: str | None = None, wait_for_loads: bool = True
    ) -> list[int]:
        """Blocks of the longest cached prefix of `token_ids` (full blocks, leaving at least one token
        to compute). The caller passes them to `allocate_slots` and counts `record_lookup`. When the
        chain goes on into the disk tier, the reads start in the background; without
        `wait_for_loads` the call returns the device part at once and sets `loads_pending`, and the
        caller asks again later."""
        if not self.enable_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self._request_hashes(request_id, token_ids, max_blocks, cache_salt)[:max_blocks]
        blocks = self.pool.lookup(hashes)
        self.loads_pending = False
        if self.tiers is not None and len(blocks) < len(hashes) and self.tiers.tier_of(hashes[len(blocks)]):
            if self.tiers.load_pending(hashes[len(blocks) :], wait=wait_for_loads):
                self.loads_pending = True  # the caller should let this request wait a step
                return blocks
            self.pool.touch(blocks)  # pin the device part of the chain while promotions allocate
            promoted = self._promote(hashes[len(blocks) :], set())
            self.pool.free(blocks[::-1])
            blocks += promoted
        return blocks

    def _promote(self, hashes: list[bytes], chain: set[int]) -> list[int]:
        """Bring the leading `hashes` found in the lower tiers back into free device blocks, filed in
        the index (cached and free, so `allocate_slots` takes them as hits). Stops at the first hash
        no tier has intact, or when every free block is of the chain itself or written by the step
        in flight (`busy_blocks`)."""
        promoted = []
        for h in hashes:
            if self.tiers.tier_of(h) is None:
                break
            b = self.pool.allocate_one(chain | self.busy_blocks)
            if b is None:
                break
            if not self.tiers.promote(h, b):
                self.pool.free([b])
                break
            self.pool.cache_block(b, h)
            self.pool.free([b])
            promoted.append(b)
            chain.add(b)
        return promoted

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens

    def tier_hit_tokens(self) -> dict[str, int]:
        """Prompt tokens promoted from each lower tier (empty without tiers)."""
        if self.tiers is None:
            return {}
        return {tier: blocks * self.block_size for tier, blocks in self.tiers.hits.items()}

    def num_cached_blocks(self, request_id: str) -> int:
        return self._num_cached.get(request_id, 0)

    def cache_computed(self, request_id: str, token_ids: list[int], num_computed: int, cache_salt: str | None = None) -> None:
        """File the request's blocks that are now full and computed in the prefix cache."""
        if not self.enable_caching:
            return
        full = min(num_computed // self.block_size, len(self._blocks.get(request_id, [])))
        done = self._num_cached.get(request_id, 0)
        if full <= done:
            return
        hashes = self._request_hashes(request_id, token_ids, full, cache_salt)
        blocks = self._blocks[request_id]
        for i in range(done, full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached[request_id] = full

    def share_prefix(self, src_id: str, dst_id: str, num_tokens: int) -> int:
        """Give `dst_id` the full blocks of `src_id` covering its first `num_tokens` tokens (shared, not copied).

        Returns how many tokens the shared blocks cover. `dst_id` must hold no blocks yet. Shared blocks
        are read-only by construction: both requests only write positions past them.
        """
        if self._blocks.get(dst_id):
            raise ValueError(f"request {dst_id!r} already holds blocks")
        blocks = self._blocks.get(src_id, [])[: num_tokens // self.block_size]
        self.pool.incref(blocks)
        self._blocks[dst_id] = list(blocks)
        return len(blocks) * self.block_size

    def check_invariants(self) -> None:
        """For tests: every block's reference count equals the number of requests holding it."""
        self.pool.check_invariants()
        counts = [0] * self.num_blocks
        for blocks in self._blocks.values():
            for b in blocks:
                counts[b] += 1
        assert counts == self.pool.ref_counts, "reference counts disagree with the holders"
