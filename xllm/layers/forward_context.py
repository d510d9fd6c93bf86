"""The one ambient global: the per-step forward context the attention layers read.

The model runner sets it around each forward pass; nothing else is global.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

_context: Any = None


@contextmanager
def forward_context(attn_metadata: Any):
    global _context
    previous, _context = _context, attn_metadata
    try:
        yield
    finally:
        _context = previous


def get_attn_metadata() -> Any:
    if _context is None:
        raise RuntimeError("attention called outside a forward context (the model runner sets one per step)")
    return _context
