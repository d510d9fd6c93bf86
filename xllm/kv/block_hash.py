"""Chained, collision-resistant hashes of full KV blocks (the keys of the prefix cache).

A block's hash is sha256 over its parent block's hash, the block's token ids (fixed-width, so the
encoding is unambiguous) and extra keys. The first block's extra key is the request's
`cache_salt`, so requests with different salts never share a block anywhere in the chain, while
equal prefixes without a salt hash the same in every process (a later cluster-wide KV index
relies on that). Python's built-in `hash` is never used: it is neither stable nor
collision-resistant.
"""

from __future__ import annotations

import hashlib
import struct
from array import array

ROOT = hashlib.sha256(b"xllm prefix cache v1").digest()


def _field(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def hash_block(parent: bytes, token_ids: list[int], extra: bytes = b"") -> bytes:
    """The hash of one full block: chained on `parent` (ROOT for the first block)."""
    h = hashlib.sha256(parent)
    h.update(_field(array("q", token_ids).tobytes()))
    h.update(_field(extra))
    return h.digest()


def salt_key(cache_salt: str | None) -> bytes:
    """Extra key of a request's first block; no salt and the empty salt differ."""
    return b"" if cache_salt is None else b"salt:" + cache_salt.encode("utf-8")


def extend_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, num_blocks: int, cache_salt: str | None) -> None:
    """Append the hashes of blocks len(hashes) .. num_blocks - 1 of `token_ids` (in place)."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else ROOT
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], salt_key(cache_salt) if i == 0 else b""))
