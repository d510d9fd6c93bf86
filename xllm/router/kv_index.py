"""The router's global KV-cache index: which block hashes each instance holds, per tier.

Instances publish batches of events (blocks stored in, or removed from, a tier) with sequence
numbers; a batch that does not follow the last one applied (a gap: a missed batch, a restarted
router) is refused, and the instance's state waits for a snapshot, which replaces it. Block hashes
are the instances' own chained sha256 hashes (xllm/kv/block_hash.py), so the router computing
them from the prompt finds exactly what an instance would find in its prefix cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from xllm.router.policies.base import TIERS


@dataclass
class _Holdings:
    seq: int = -1  # the last batch applied
    stale: bool = False  # a gap was seen: waiting for a snapshot
    tiers: dict[str, set[bytes]] = field(default_factory=lambda: {t: set() for t in TIERS})


class KVIndex:
    def __init__(self):
        self._instances: dict[str, _Holdings] = {}

    def instances(self) -> list[str]:
        return sorted(self._instances)

    def apply(self, instance: str, seq: int, events: Iterable[tuple[str, str, Sequence[bytes]]]) -> bool:
        """Apply one batch: events ("stored" | "removed", tier, hashes). False (nothing applied) if
        it does not follow the last batch: the instance then needs a `snapshot`."""
        h = self._instances.setdefault(instance, _Holdings())
        if h.stale or (h.seq >= 0 and seq != h.seq + 1):
            h.stale = True
            return False
        for kind, tier, hashes in events:
            if tier not in h.tiers:
                raise ValueError(f"unknown KV tier {tier!r}")
            if kind == "stored":
                h.tiers[tier].update(hashes)
            elif kind == "removed":
                h.tiers[tier].difference_update(hashes)
            else:
                raise ValueError(f"unknown KV event {kind!r}")
        h.seq = seq
        return True

    def needs_snapshot(self, instance: str) -> bool:
        h = self._instances.get(instance)
        return h is None or h.stale

    def snapshot(self, instance: str, seq: int, tiers: dict[str, Iterable[bytes]]) -> None:
        """Replace what is known of `instance` with its full state as of batch `seq`."""
        h = self._instances[instance] = _Holdings(seq=seq)
        for tier, hashes in tiers.items():
            if tier not in h.tiers:
                raise ValueError(f"unknown KV tier {tier!r}")
            h.tiers[tier] = set(hashes)

    def remove(self, instance: str) -> None:
        """The instance left the cluster (its lease expired)."""
        self._instances.pop(instance, None)

    def matched(self, instance: str, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Leading blocks of the chain the instance holds, each counted in the fastest tier that
        holds it; the chain stops at the first block no tier holds. A stale instance matches nothing."""
        counts = {t: 0 for t in TIERS}
        h = self._instances.get(instance)
        if h is None or h.stale:
            return counts
        for block in block_hashes:
            tier = next((t for t in TIERS if block in h.tiers[t]), None)
            if tier is None:
                break
            counts[tier] += 1
        return counts
