"""KV-cache-aware: an instance with room for the request's blocks now, fewest waiting first, then
the most free KV; when none has room, the one with the fewest waiting (it queues there)."""

from __future__ import annotations

from xllm.router.policies.base import Choice, Policy, healthy, load_key


class KVAware(Policy):
    name = "kv-aware"

    def select(self, request, instances, index=None) -> Choice:
        live = healthy(instances)
        fits = [i for i in live if i.free_blocks * i.block_size > request.num_prompt_tokens]
        if fits:
            best = min(fits, key=lambda i: (i.waiting, -i.free_blocks / max(1, i.num_blocks), i.name))
            return Choice(best.name, reason="room for its KV")
        return Choice(min(live, key=load_key).name, reason="no instance has room: least load")
