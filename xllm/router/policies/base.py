"""What a routing policy sees and answers: pure values, no I/O.

A policy is `select(request, instances, index) -> Choice`: the request (its prompt length and
chained block hashes, computed by the router as the instances compute them), the instances that
can serve it (with the load they last published), and the global KV index (what each holds, per
tier). It raises `NoInstanceError` when there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

TIERS = ("device", "host", "disk")  # fastest first


class NoInstanceError(RuntimeError):
    """No healthy instance serves the request's model."""


@dataclass(frozen=True)
class InstanceState:
    """An instance as the router last heard of it."""

    name: str
    running: int = 0  # sequences running
    waiting: int = 0  # requests waiting for their first step
    num_blocks: int = 1  # KV capacity, in blocks
    free_blocks: int = 0  # KV blocks free now (cached ones count as free: they can be evicted)
    block_size: int = 16
    healthy: bool = True

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / max(1, self.num_blocks)


@dataclass(frozen=True)
class RouteRequest:
    num_prompt_tokens: int
    block_hashes: tuple[bytes, ...] = ()  # the prompt's full blocks, chained (xllm/kv/block_hash.py)


@dataclass(frozen=True)
class Choice:
    instance: str
    matched_blocks: int = 0  # the prefix it is expected to find cached (any tier)
    reason: str = ""


class CacheIndex(Protocol):
    def matched(self, instance: str, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Leading blocks of `block_hashes` the instance holds, counted in the fastest tier that
        holds each: {tier: blocks}."""


class Policy:
    name = "base"

    def select(self, request: RouteRequest, instances: Sequence[InstanceState], index: CacheIndex | None) -> Choice:
        raise NotImplementedError


def healthy(instances: Sequence[InstanceState]) -> list[InstanceState]:
    live = [i for i in instances if i.healthy]
    if not live:
        raise NoInstanceError("no healthy instance serves this model")
    return live


def load_key(i: InstanceState) -> tuple:
    """Least loaded first: waiting requests, then running ones, then KV usage; the name breaks ties."""
    return (i.waiting, i.running, i.kv_usage, i.name)
