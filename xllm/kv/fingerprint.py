"""The fingerprint of what produced a KV cache: weights, dtype, block size, layout, rank.

Two caches with the same fingerprint hold the same bytes for the same block hash, so lower KV
tiers are keyed by it (a folder written by another model or dtype is never reused), and a
cluster uses it to tell which instances can share KV. The weights part is the sha256 of the
checkpoint's files (safetensors and config), computed once per file version and remembered in
the cache folder (keyed by path, size and modification time).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading

from xllm.config import default_cache_dir

_CHUNK = 8 << 20
_lock = threading.Lock()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(folder: str, cache_dir: str | None = None) -> str:
    """sha256 over the folder's weight files and config (hex), each file's digest remembered."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors"))) + [os.path.join(folder, "config.json")]
    memo_path = os.path.join(cache_dir or default_cache_dir(), "file-sha256.json")
    with _lock:
        try:
            with open(memo_path) as f:
                memo = json.load(f)
        except (OSError, ValueError):
            memo = {}
        total = hashlib.sha256()
        changed = False
        for path in files:
            if not os.path.exists(path):
                continue
            st = os.stat(path)
            key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
            digest = memo.get(key)
            if digest is None:
                digest = memo[key] = _file_sha256(path)
                changed = True
            total.update(os.path.basename(path).encode() + b"\0" + bytes.fromhex(digest))
        if changed:
            os.makedirs(os.path.dirname(memo_path), exist_ok=True)
            tmp = f"{memo_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(memo, f)
            os.replace(tmp, memo_path)
    return total.hexdigest()


def kv_fingerprint(weights: str, dtype: str, block_size: int, kv_layout: str, rank: int, block_shape: tuple) -> tuple[bytes, dict]:
    """(16-byte fingerprint, what it was made of) for a KV cache of these settings."""
    description = {
        "weights_sha256": weights, "dtype": dtype, "block_size": block_size, "kv_layout": kv_layout, "rank": rank,
        "block_shape": list(block_shape),
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).digest()[:16]
    return digest, description
