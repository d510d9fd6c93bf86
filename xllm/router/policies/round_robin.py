"""Round-robin over the healthy instances, in name order (the one policy that keeps a counter)."""

from __future__ import annotations

from xllm.router.policies.base import Choice, Policy, healthy


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self):
        self.turn = 0

    def select(self, request, instances, index=None) -> Choice:
        live = sorted(healthy(instances), key=lambda i: i.name)
        choice = live[self.turn % len(live)]
        self.turn += 1
        return Choice(choice.name, reason="round-robin")
