"""Routing policies by name (a plain dict, imported lazily); each a pure `select`."""

from __future__ import annotations

import importlib

from xllm.router.policies.base import Choice, InstanceState, NoInstanceError, Policy, RouteRequest

_POLICIES = {
    "round-robin": ("xllm.router.policies.round_robin", "RoundRobin"),
    "least-load": ("xllm.router.policies.least_load", "LeastLoad"),
    "kv-aware": ("xllm.router.policies.kv_aware", "KVAware"),
    "prefix-aware": ("xllm.router.policies.prefix_aware", "PrefixAware"),
}
POLICY_NAMES = tuple(_POLICIES)

__all__ = ["POLICY_NAMES", "Choice", "InstanceState", "NoInstanceError", "Policy", "RouteRequest", "get_policy"]


def get_policy(name: str, **options) -> Policy:
    try:
        module, cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
    return getattr(importlib.import_module(module), cls)(**options)
