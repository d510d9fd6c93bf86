"""The least-loaded instance: fewest waiting, then fewest running, then the least KV in use."""

from __future__ import annotations

from xllm.router.policies.base import Choice, Policy, healthy, load_key


class LeastLoad(Policy):
    name = "least-load"

    def select(self, request, instances, index=None) -> Choice:
        return Choice(min(healthy(instances), key=load_key).name, reason="least load")
