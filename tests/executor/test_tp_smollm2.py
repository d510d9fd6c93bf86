"""Worker ranks on the real SmolLM2 (float32, greedy): tensor parallelism over 2 and 3 ranks (9
query and 3 KV heads: 2 ranks split them 2 + 1 KV heads), and one rank in its own process, each
give TP = 1's tokens, and transformers' (near-tie rule: tests/near_tie.py). One long-lived engine
per configuration; the configurations cover batching, chunked prefill, preemption, prefix-cache
hits, both KV layouts, overlap on and off, and seeded sampling (the ranks' own generators)."""

import pytest
from near_tie import teacher_forced

from xllm import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. " * 6,  # 61 tokens: chunked under a small budget
    "Once upon a time, in a land far away,",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, n=2)

CONFIGS = {
    # chunked prefill (32-token chunks, a 48-token budget), and 14 blocks of 16 tokens for six
    # requests of up to 85 tokens: preemptions
    "tp2-chunked-preempt": dict(tensor_parallel_size=2, num_blocks=14, max_num_batched_tokens=48, max_prefill_chunk=32),
    "tp2-xtensor-serial": dict(tensor_parallel_size=2, kv_layout="xtensor", overlap=False, kv_cache_memory_gib=0.25),
    "tp3": dict(tensor_parallel_size=3, kv_cache_memory_gib=0.25),
    "one-rank-process": dict(distributed_executor_backend="mp", kv_cache_memory_gib=0.25),
}


@pytest.fixture(scope="module")
def reference(smollm2_llm):
    greedy = [o.outputs[0].token_ids for o in smollm2_llm.generate(PROMPTS, GREEDY)]
    seeded = [c.token_ids for c in smollm2_llm.generate(PROMPTS[:2], SEEDED)[0].outputs]
    return greedy, seeded


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def engine(request):
    llm = LLM(dtype="float32", **CONFIGS[request.param])
    yield request.param, llm
    llm.shutdown()


def test_greedy_output_equals_one_rank_and_transformers(engine, reference, hf_smollm2):
    name, llm = engine
    outs = llm.generate(PROMPTS, GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    _, hf = hf_smollm2
    for prompt, out, ref in zip(outs, got, reference[0]):
        stop, mismatch = teacher_forced(hf, prompt.prompt_token_ids, out)
        assert mismatch is None, f"{name}: token {mismatch} is not transformers' argmax"
        assert out[:stop] == ref[:stop], f"{name}: differs from TP = 1 before a near tie"
    scheduler, kv = llm.engine.scheduler, llm.engine.kv
    if name == "tp2-chunked-preempt":
        assert scheduler.num_preemptions > 0
    # the same prompts again: prefix-cache hits, the same tokens
    again = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert again == got and kv.prefix_cache_hits > 0
    assert kv.num_free_blocks == kv.num_blocks  # nothing leaked


def test_seeded_sampling_equals_one_rank(engine, reference):
    """Every rank samples with its own generator (built from the seed); they agree, and with TP = 1."""
    _, llm = engine
    out = llm.generate(PROMPTS[:2], SEEDED)[0]
    assert [c.token_ids for c in out.outputs] == reference[1]


def test_the_handoff_is_measured(engine):
    name, llm = engine
    h = llm.engine.executor.handoff
    assert h.steps > 0 and 0 < h.handoff_s < h.step_s and h.bytes_out > 0 and h.bytes_in > 0


def test_a_rank_that_dies_between_steps_is_seen_at_once():
    """The watchdog sees a rank die while nothing runs: the engine turns unhealthy, the next step
    raises `WorkerDiedError` at once (no collective waits for the dead rank), the rest stop."""
    import os
    import signal
    import time

    from xllm.executor import WorkerDiedError

    llm = LLM(dtype="float32", distributed_executor_backend="mp", kv_cache_memory_gib=0.1)
    try:
        executor = llm.engine.executor
        assert llm.engine.healthy
        os.kill(executor.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while llm.engine.healthy:
            assert time.monotonic() < deadline, "the watchdog did not see the rank die"
            time.sleep(0.05)
        assert "died" in executor.dead
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match="died"):
            llm.generate(["Hello"], SamplingParams(max_tokens=4))
        assert time.monotonic() - started < 5
        assert all(not p.is_alive() for p in executor.procs)
    finally:
        llm.shutdown()
