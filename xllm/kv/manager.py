"""The KV cache manager: which blocks each request holds, and the prefix cache over them.

The scheduler asks it for room (`allocate_slots`) and gets back yes or no; it asks for a request's
block ids when it hands the step to the runner, and frees a request's blocks when it finishes or
is preempted. It never exposes the pool's internals to the scheduler.

Prefix caching (on by default): once a block of a request is full and computed, `cache_computed`
files it under the hash of its tokens chained on all earlier ones (`block_hash.py`); a new request
asks `find_cached_prefix` for the longest chain of its full blocks already in the cache, gets those
blocks shared (reference-counted, read-only: nobody writes below its computed length) and computes
only the rest. At least one token is always computed, so the last position's logits exist.

Below the device cache a KV connector may keep evicted blocks (the host/disk tiers, `kv/tiers/`):
the manager tells it what the pool evicts, and a lookup that runs out of device hits asks it for
the rest of the chain. Found blocks are loaded into free device blocks by the worker before the
step that uses them runs (the manager only records the loads; it does no I/O).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xllm.kv.block_hash import extend_hashes
from xllm.kv.block_pool import BlockPool
from xllm.kv.connector import KVConnectorMeta, KVConnectorOutput, PrefixLookup

if TYPE_CHECKING:
    from xllm.kv.connector import KVConnectorScheduler

logger = logging.getLogger(__name__)


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True,
        connector: KVConnectorScheduler | None = None, lookahead: bool = False,
    ):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.connector = connector if enable_caching else None
        if self.connector is not None:
            self.pool.on_evict = self.connector.on_evict
        # Running requests also get the block their next token will need, when blocks are plentiful
        # (the xtensor runner maps it ahead, off the critical path).
        self.lookahead = lookahead
        self._blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # per request: hashes of its full blocks so far
        self._num_cached: dict[str, int] = {}  # per request: leading blocks already filed in the index
        self._freed: list[str] = []  # requests whose blocks were freed since the last `take_freed`
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found in the cache
        self.num_promotion_errors = 0  # lookups whose loads from a lower tier failed (taken as misses)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones included: they are evictable)."""
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.pool.num_blocks

    def can_allocate(self, request_id: str, total_tokens: int) -> bool:
        """Whether `allocate_slots(request_id, total_tokens)` would succeed now."""
        return self.blocks_needed(total_tokens) - len(self.block_ids(request_id)) <= self.pool.num_free

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

    # ---- the connector's traffic --------------------------------------------------------------
    def take_connector_meta(self, nothing_else_runs: bool = False) -> KVConnectorMeta:
        """The transfers recorded since the last call, for the step being scheduled. With
        `nothing_else_runs` and reads in flight, the worker may wait for one (there is no work)."""
        if self.connector is None:
            return KVConnectorMeta()
        meta = self.connector.take_meta()
        meta.wait_for_reads = nothing_else_runs and self.reads_pending
        return meta

    @property
    def reads_pending(self) -> bool:
        """A connector is reading blocks in for some waiting request."""
        return self.connector is not None and self.connector.reads_pending

    def connector_update(self, output: KVConnectorOutput | None) -> None:
        if self.connector is not None and output:
            self.connector.update(output)

    # ---- prefix caching -----------------------------------------------------------------------
    def _request_hashes(self, request_id: str, token_ids: list[int], num_blocks: int, cache_salt: str | None) -> list[bytes]:
        hashes = self._hashes.setdefault(request_id, [])
        if len(hashes) < num_blocks:
            extend_hashes(hashes, token_ids, self.block_size, num_blocks, cache_salt)
        return hashes

    def find_cached_prefix(
        self, request_id: str, token_ids: list[int], cache_salt: str | None = None, fetch: bool = True
    ) -> PrefixLookup:
        """Blocks of the longest cached prefix of `token_ids` (full blocks, leaving at least one token
        to compute), and whether more of the chain is still being read from a lower tier (then the
        caller lets the request wait and asks again later; without `fetch` no read is started and
        the request takes what is here). The caller passes the blocks to `allocate_slots` and
        counts `record_lookup`."""
        if not self.enable_caching:
            return PrefixLookup([])
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self._request_hashes(request_id, token_ids, max_blocks, cache_salt)[:max_blocks]
        blocks = self.pool.lookup(hashes)
        if self.connector is None or len(blocks) == len(hashes):
            return PrefixLookup(blocks)
        rest = hashes[len(blocks) :]
        promoted = self._promote(blocks, rest[: self.connector.available(rest)])
        blocks = blocks + promoted
        rest = rest[len(promoted) :]
        pending = fetch and bool(rest) and self.connector.fetch(rest)
        return PrefixLookup(blocks, pending)

    def _promote(self, chain: list[int], hashes: list[bytes]) -> list[int]:
        """Load the blocks of `hashes` (the connector has them) into free device blocks, filed in
        the index (cached and free, so `allocate_slots` takes them as hits). The device part of the
        chain is pinned meanwhile, so no allocation here evicts it; an error ends the chain there,
        with every pin and allocation undone (the request computes the rest)."""
        promoted: list[int] = []
        self.pool.touch(chain)
        try:
            avoid = set(chain)
            for h in hashes:
                b = self.pool.allocate_one(avoid)
                if b is None:
                    break
                try:
                    self.connector.load(h, b)
                    self.pool.cache_block(b, h)
                finally:
                    self.pool.free([b])
                promoted.append(b)
                avoid.add(b)
        except Exception:  # noqa: BLE001 - a lower tier failing is a cache miss, never a lost block
            self.num_promotion_errors += 1
            logger.exception("loading KV blocks from a lower tier failed; the request computes them")
            for b in promoted:
                self.pool.uncache_block(b)
            promoted = []
        finally:
            self.pool.free(chain[::-1])
        return promoted

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens

    def tier_hit_tokens(self) -> dict[str, int]:
        """Prompt tokens loaded back from each lower tier (empty without tiers)."""
        if self.connector is None:
            return {}
        return {tier: blocks * self.block_size for tier, blocks in self.connector.hits.items()}

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
