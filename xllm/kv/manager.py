"""The KV cache manager: which blocks each request holds.

The scheduler asks it for room (`allocate_slots`) and gets back yes or no; it asks for a request's
block ids when it hands the step to the runner, and frees a request's blocks when it finishes or
is preempted. It never exposes the pool itself.
"""

from __future__ import annotations

from xllm.kv.block_pool import BlockPool


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.pool.num_blocks

    def allocate_slots(self, request_id: str, total_tokens: int) -> bool:
        """Make the request hold enough blocks for `total_tokens` tokens; False (and no change) if short."""
        held = self._blocks.setdefault(request_id, [])
        extra = self.blocks_needed(total_tokens) - len(held)
        if extra <= 0:
            return True
        if extra > self.pool.num_free:
            return False
        held.extend(self.pool.allocate(extra))
        return True

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def free(self, request_id: str) -> None:
        blocks = self._blocks.pop(request_id, None)
        if blocks:
            self.pool.free(blocks)

    def usage(self) -> float:
        return self.pool.usage()

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
