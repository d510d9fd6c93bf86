"""The xtensor KV layout on the real model: the same greedy tokens and logprobs as the paged layout,
through chunked prefill, prefix-cache hits (shared pages mapped into several ranges), preemption,
parallel samples, the torch path, and a lower cache tier; no mapping outlives its request."""

from __future__ import annotations

import gc

import pytest

from xllm import LLM, SamplingParams
from xllm.kv.xtensor import pool_mappings
from xllm.ops import cpu_kernels

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant for a bakery. You know every bread, its flour, its oven time and its price. " * 4
PROMPTS = [
    SYSTEM + "Which bread has the longest oven time?",
    SYSTEM + "What flour goes into rye bread?",
    "Write a haiku about the sea.",
    SYSTEM + "How much is a baguette?",
    "List the planets of the solar system in order:",
]
PARAMS = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)


def run(layout: str, prompts=PROMPTS, params=PARAMS, **kwargs):
    llm = LLM(dtype="float32", max_model_len=1024, kv_layout=layout, **kwargs)
    first = llm.generate(prompts[:1], params)  # fills the prefix cache: later prompts hit it
    rest = llm.generate(prompts[1:], params)
    return llm, first + rest


def assert_same(outs_a, outs_b):
    for a, b in zip(outs_a, outs_b, strict=True):
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert ca.token_ids == cb.token_ids
            for la, lb in zip(ca.logprobs, cb.logprobs):
                for tok, lp in la.items():
                    assert abs(lp.logprob - lb[tok].logprob) < 2e-3


@pytest.fixture(scope="module")
def paged_outputs():
    return run("paged", kv_cache_memory_gib=0.1, max_num_batched_tokens=64)[1]


def test_xtensor_matches_paged_with_chunks_and_prefix_hits(paged_outputs):
    llm, outs = run("xtensor", kv_cache_memory_gib=0.1, max_num_batched_tokens=64)
    assert sum(o.num_cached_tokens for o in outs) >= 3 * 64  # the shared system prompt was hit
    assert_same(outs, paged_outputs)
    pool = llm.engine.runner.xtensor
    llm.engine.step()  # an empty step hands the last finished requests' ranges back
    assert pool.num_active == 0 and pool_mappings() >= 1
    pool.check_invariants()
    llm.engine.kv.check_invariants()


def test_xtensor_matches_paged_on_the_torch_path(paged_outputs, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_enabled", False)  # one SDPA per sequence over its range
    _, outs = run("xtensor", kv_cache_memory_gib=0.1, max_num_batched_tokens=64)
    assert_same(outs, paged_outputs)


def test_xtensor_under_preemption_and_parallel_samples():
    """A cache too small for the batch: requests are preempted, freed, readmitted (new ranges)."""
    params = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=60, ignore_eos=True)
    kwargs = dict(num_blocks=14, max_num_seqs=8)
    paged_llm, paged = run("paged", PROMPTS[2:], params, **kwargs)
    xt_llm, xt = run("xtensor", PROMPTS[2:], params, **kwargs)
    assert xt_llm.engine.scheduler.num_preemptions > 0
    assert xt_llm.engine.scheduler.num_preemptions == paged_llm.engine.scheduler.num_preemptions
    for a, b in zip(xt, paged, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_xtensor_with_a_host_tier():
    """Blocks demoted to the host tier and promoted back are copied through the physical view and
    seen through the ranges that map them (40 blocks: three ~300-token prompts cannot all stay)."""
    prompts = [f"Story number {i}: " + SYSTEM * 3 for i in range(3)]
    cold = run("paged", prompts[:1], PARAMS, num_blocks=40, enable_prefix_caching=False)[1]
    llm = LLM(dtype="float32", max_model_len=1024, kv_layout="xtensor", num_blocks=40, kv_host_memory_gib=0.05)
    for p in prompts:
        llm.generate([p], PARAMS)
    assert llm.engine.kv.pool.num_evictions > 0
    again = llm.generate(prompts[:1], PARAMS)
    assert llm.engine.kv.connector.hits["host"] >= 5
    assert_same(again, cold)


def test_pool_goes_away_with_the_engine():
    gc.collect()
    before = pool_mappings()
    llm = LLM(dtype="float32", max_model_len=256, kv_layout="xtensor", kv_cache_memory_gib=0.05)
    llm.generate(["Hello"], SamplingParams(max_tokens=4))
    assert pool_mappings() > before
    del llm
    gc.collect()
    assert pool_mappings() == before


def test_decode_pages_are_mapped_ahead_by_the_helper():
    """With overlap, a running request also holds the block its next token needs (when blocks
    are plentiful), and the helper maps it during the forward pass: decode steps map nothing."""
    prompts = [f"Count the bakery's loaves, batch {i}:" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)
    llm = LLM(dtype="float32", max_model_len=256, kv_layout="xtensor", kv_cache_memory_gib=0.1)
    outs = llm.generate(prompts, params)
    runner = llm.engine.runner
    prompt_pages = sum(-(-len(o.prompt_token_ids) // 16) for o in outs)
    assert runner.pages_mapped_ahead >= 4 * 4  # ~70 decode tokens each: 4+ block crossings per request
    assert runner.pages_mapped_in_step <= prompt_pages  # only the prompts' pages, mapped when prefilled
    paged = LLM(dtype="float32", max_model_len=256, kv_cache_memory_gib=0.1).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in paged]
    llm.engine.step()
    llm.engine.kv.check_invariants()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks  # look-ahead blocks were freed too
