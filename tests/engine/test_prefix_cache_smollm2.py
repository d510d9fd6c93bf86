"""Prefix caching on the real model: a cache hit changes nothing but the work done."""

from __future__ import annotations

import os

import pytest

from xllm import LLM, SamplingParams

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant for a bakery. You know every bread, its flour, its oven time and its price. " * 5
QUESTIONS = ["Which bread has the longest oven time?", "What flour goes into rye bread?", "How much is a baguette?"]
PARAMS = SamplingParams(temperature=0, max_tokens=16, logprobs=2, ignore_eos=True)


def assert_same(a, b, tolerance=2e-3):
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
        for tok, lp in la.items():
            assert abs(lp.logprob - lb[tok].logprob) < tolerance


def test_outputs_identical_with_and_without_a_cache_hit(smollm2_llm):
    no_cache = LLM(dtype="float32", kv_cache_memory_gib=0.1, enable_prefix_caching=False)
    prompts = [SYSTEM + q for q in QUESTIONS]
    cold = no_cache.generate(prompts, PARAMS)
    assert all(o.num_cached_tokens == 0 for o in cold)
    first = smollm2_llm.generate(prompts[:1], PARAMS)[0]  # fills the cache with the shared prefix
    warm = smollm2_llm.generate(prompts[1:], PARAMS)
    prefix_len = len(smollm2_llm.get_tokenizer().encode(SYSTEM))
    for out in warm:
        assert out.num_cached_tokens >= prefix_len - 16 - 8 and out.num_cached_tokens % 16 == 0
    for a, b in zip([first, *warm], cold):
        assert_same(a, b)
    # The same prompt again: everything but the last block comes from the cache.
    again = smollm2_llm.generate(prompts[:1], PARAMS)[0]
    assert again.num_cached_tokens == (len(again.prompt_token_ids) - 1) // 16 * 16
    assert_same(again, cold[0])


def test_salt_isolates_tenants(smollm2_llm):
    engine = smollm2_llm.engine
    prompt = "Tenant data: the vault code is in the blue folder on the third shelf. " * 4
    outs = {}
    for rid, salt in (("t1-a", "t1"), ("t2", "t2"), ("t1-b", "t1"), ("none", None)):
        engine.add_request(prompt, SamplingParams(max_tokens=1), rid, cache_salt=salt)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out
    assert outs["t1-a"].num_cached_tokens == 0 and outs["t2"].num_cached_tokens == 0
    assert outs["t1-b"].num_cached_tokens > 0 and outs["none"].num_cached_tokens == 0


def _run(llm, prompts, params=PARAMS):
    return llm.generate(prompts, params)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_round_trip_through_a_lower_tier_gives_the_same_output(tier, tmp_path):
    # A device cache of 40 blocks (640 tokens): three ~330-token prompts cannot all stay cached.
    tiers = {"kv_host_memory_gib": 0.05} if tier == "host" else {"kv_host_memory_gib": 0.0, "kv_disk_dir": str(tmp_path)}
    llm = LLM(dtype="float32", num_blocks=40, **tiers)
    reference = LLM(dtype="float32", num_blocks=40, enable_prefix_caching=False)
    prompts = [f"Story number {i}: " + SYSTEM * 2 + QUESTIONS[i] for i in range(3)]
    cold = _run(reference, prompts[:1])[0]
    _run(llm, prompts[:1])
    _run(llm, prompts[1:2])
    _run(llm, prompts[2:3])  # prompt 0's blocks were evicted from the device cache by now
    assert llm.engine.kv.pool.num_evictions > 0
    again = _run(llm, prompts[:1])[0]
    assert again.num_cached_tokens == (len(again.prompt_token_ids) - 1) // 16 * 16  # the whole prefix came back
    assert llm.engine.kv.connector.hits[tier] >= 5
    assert_same(again, cold)


def test_corrupted_disk_entry_is_recomputed(tmp_path):
    llm = LLM(dtype="float32", num_blocks=40, kv_disk_dir=str(tmp_path))
    prompts = [f"Story number {i}: " + SYSTEM * 2 + QUESTIONS[i] for i in range(3)]
    reference = _run(LLM(dtype="float32", num_blocks=40, enable_prefix_caching=False), prompts[:1])[0]
    for p in prompts:
        _run(llm, [p])
    llm.engine.runner.kv_connector.flush()  # the writer thread has written every entry
    files = sorted(tmp_path.glob("*/*.kv"), key=lambda f: f.stat().st_mtime)
    assert files
    for f in files:  # damage every entry
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x55
        f.write_bytes(bytes(data))
    again = _run(llm, prompts[:1])[0]
    assert llm.engine.kv.connector.hits["disk"] == 0 and llm.engine.kv.connector.num_corrupt >= 1
    assert_same(again, reference)


def test_a_disk_folder_of_another_dtype_or_foreign_files_is_never_used(tmp_path):
    """Engines of two dtypes share a --kv-disk-dir: each keeps its own fingerprint folder, neither
    reads the other's entries, and stray files in the folder crash nothing."""
    prompts = [f"Story number {i}: " + SYSTEM * 2 + QUESTIONS[i] for i in range(3)]
    (tmp_path / "not-a-folder.kv").write_bytes(b"garbage")
    folders = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(dtype=dtype, num_blocks=40, kv_disk_dir=str(tmp_path))
        reference = _run(LLM(dtype=dtype, num_blocks=40, enable_prefix_caching=False), prompts[:1])[0]
        for p in prompts:
            _run(llm, [p])
        worker = llm.engine.runner.kv_connector
        worker.flush()
        folders[dtype] = worker.disk.folder
        (tmp_path / os.path.basename(worker.disk.folder) / ("ab" * 32 + ".kv")).write_bytes(b"stray")
        again = _run(llm, prompts[:1])[0]
        # bfloat16: the same tokens; logprobs differ with the chunking by more than its rounding
        assert_same(again, reference, 2e-3 if dtype == "float32" else float("inf"))
        if dtype == "bfloat16":  # the float32 entries were there, under another fingerprint: none was read
            assert llm.engine.kv.connector.hits["disk"] >= 5 and llm.engine.kv.connector.num_corrupt == 0
        worker.close()
    assert folders["float32"] != folders["bfloat16"]
    assert all(any(f.endswith(".kv") for f in os.listdir(d)) for d in folders.values())
