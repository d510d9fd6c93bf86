"""The KV fingerprint: what produced a cache (weights, dtype, block size, layout, rank)."""

from __future__ import annotations

import json
import os

from xllm.kv.fingerprint import kv_fingerprint, weights_fingerprint


def folder(tmp_path, weights: bytes):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return str(tmp_path)


def test_weights_fingerprint_follows_the_files_and_is_remembered(tmp_path):
    cache = str(tmp_path / "cache")
    a = folder(tmp_path / "a", b"weights-one")
    b = folder(tmp_path / "b", b"weights-two")
    fa = weights_fingerprint(a, cache)
    assert fa == weights_fingerprint(a, cache) and fa != weights_fingerprint(b, cache)
    assert weights_fingerprint(folder(tmp_path / "c", b"weights-one"), cache) == fa  # content, not path
    memo = json.load(open(os.path.join(cache, "file-sha256.json")))
    assert len(memo) == 6  # two files of three folders, each hashed once
    with open(os.path.join(a, "model.safetensors"), "wb") as f:
        f.write(b"weights-changed")
    assert weights_fingerprint(a, cache) != fa  # a new size and mtime: hashed again


def test_kv_fingerprint_changes_with_each_part():
    base = dict(weights="w" * 64, dtype="float32", block_size=16, kv_layout="paged", rank=0, block_shape=(30, 2, 16, 3, 64))
    fp, description = kv_fingerprint(**base)
    assert len(fp) == 16 and description["dtype"] == "float32"
    for key, other in [("weights", "v" * 64), ("dtype", "bfloat16"), ("block_size", 32), ("kv_layout", "xtensor"),
                       ("rank", 1), ("block_shape", (30, 2, 16, 3, 128))]:
        assert kv_fingerprint(**{**base, key: other})[0] != fp, key
