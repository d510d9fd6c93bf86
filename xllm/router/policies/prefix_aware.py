"""Prefix-cache-aware: the instance where the request costs least, counting what it has cached.

The router sees each instance's cache exactly (the global KV index holds the block hashes every
instance published), so it does not estimate the match, as SGLang's approximate per-worker radix
tree does. It prices it. For a request of R prompt blocks, on instance i:

    prefill_i = R - (d_i + (1 - HOST_COST) h_i + (1 - DISK_COST) k_i)
    cost_i    = PREFILL_WEIGHT * prefill_i + active_i + waiting_i * R

- d_i, h_i and k_i are the leading blocks it holds on the device, in host memory and on disk.
  A block from host memory costs HOST_COST of recomputing it, and a block from disk DISK_COST.
- `prefill_i` is thus the prefill work in blocks.
- `active_i` (blocks in use) is what every decode step there reads.
- `waiting_i * R` stands for the prompts queued ahead of this one.

This is Dynamo's KV-router cost (prefill blocks weighted, plus active blocks), made tier-aware
and given the queue. The lowest cost wins, ties by name. An instance without room for the blocks
it must add is taken only if none has room. A balance guard, after SGLang's, holds when the
queues are far apart: when the longest queue exceeds the shortest by more than
`balance_abs_threshold` and by more than `balance_rel_threshold` times. Then the request goes to
the least-loaded instance, whatever it holds.
"""

from __future__ import annotations

from xllm.router.policies.base import Choice, InstanceState, Policy, RouteRequest, healthy, load_key

HOST_COST = 0.1  # a host -> device copy against recomputing the block
DISK_COST = 0.5  # a disk read, then the copy


class PrefixAware(Policy):
    name = "prefix-aware"

    def __init__(self, prefill_weight: float = 1.0, balance_abs_threshold: int = 32, balance_rel_threshold: float = 1.5):
        self.prefill_weight = prefill_weight
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def cost(self, request: RouteRequest, instance: InstanceState, matched: dict[str, int]) -> float:
        blocks = max(1, -(-request.num_prompt_tokens // instance.block_size))
        cached = matched["device"] + (1 - HOST_COST) * matched["host"] + (1 - DISK_COST) * matched["disk"]
        prefill = blocks - cached
        active = instance.num_blocks - instance.free_blocks
        return self.prefill_weight * prefill + active + instance.waiting * blocks

    def select(self, request, instances, index=None) -> Choice:
        live = healthy(instances)
        waits = [i.waiting for i in live]
        if max(waits) - min(waits) > self.balance_abs_threshold and max(waits) > self.balance_rel_threshold * min(waits):
            return Choice(min(live, key=load_key).name, reason="imbalanced: least load")
        empty = {"device": 0, "host": 0, "disk": 0}
        scored = []
        for i in live:
            matched = index.matched(i.name, request.block_hashes) if index is not None else empty
            held = sum(matched.values())
            blocks = -(-request.num_prompt_tokens // i.block_size)
            room = i.free_blocks >= blocks - matched["device"]
            scored.append((not room, self.cost(request, i, matched), i.name, held))
        no_room, _, name, held = min(scored)
        return Choice(name, matched_blocks=held, reason="least cost" + (" (none has room)" if no_room else ""))
