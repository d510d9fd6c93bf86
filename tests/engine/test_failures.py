"""One failing request fails alone, and streaming costs O(tokens): fault injection and copy counts
on the real model (SmolLM2, float32)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from xllm import LLM, SamplingParams
from xllm.engine.async_llm import AsyncLLM, _Stream
from xllm.engine.detokenizer import IncrementalDetokenizer
from xllm.outputs import CompletionOutput, RequestOutput

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(smollm2_llm):
    return [o.outputs[0].token_ids for o in smollm2_llm.generate(PROMPTS, GREEDY)]


def run_all(engine, ids):
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert set(finals) == set(ids)
    return finals


def assert_clean(engine):
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.has_unfinished_requests()


@pytest.mark.parametrize("overlap", [False, True])
def test_a_request_whose_output_processing_raises_fails_alone(reference, monkeypatch, overlap):
    llm = LLM(dtype="float32", kv_cache_memory_gib=0.1, overlap=overlap)
    engine = llm.engine
    real = IncrementalDetokenizer.update

    def update(self, token_ids, *args, **kwargs):
        if len(token_ids) == 5 and getattr(self, "doomed", False):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self, token_ids, *args, **kwargs)

    monkeypatch.setattr(IncrementalDetokenizer, "update", update)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.outputs.groups[ids[1]].samples[0].detokenizer.doomed = True
    finals = run_all(engine, ids)
    failed = finals[ids[1]]
    assert failed.outputs[0].finish_reason == "error" and "injected" in failed.error
    for i in (0, 2, 3):
        assert finals[ids[i]].error is None and finals[ids[i]].outputs[0].token_ids == reference[i]
    assert_clean(engine)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference  # and it goes on


def test_a_request_whose_kv_range_cannot_be_mapped_fails_alone(reference):
    """xtensor: mapping a request's pages into its range fails (no range left, mmap refused): the
    step runs without it, it ends with an error, its blocks are freed, the others are unchanged."""
    llm = LLM(dtype="float32", kv_cache_memory_gib=0.1, kv_layout="xtensor", max_model_len=256)
    engine = llm.engine
    pool = engine.runner.xtensor
    real = pool.map_pages
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]

    def map_pages(seq_id, pages):
        if seq_id == ids[2] and len(pages) >= 1 and pool.has(seq_id):
            raise OSError(12, "injected: cannot map")
        return real(seq_id, pages)

    pool.map_pages = map_pages
    try:
        finals = run_all(engine, ids)
    finally:
        del pool.map_pages
    assert finals[ids[2]].outputs[0].finish_reason == "error" and "could not be mapped" in finals[ids[2]].error
    for i in (0, 1, 3):
        assert finals[ids[i]].outputs[0].token_ids == reference[i]
    assert_clean(engine)
    pool.check_invariants()


def test_over_http_a_failed_request_is_a_500_in_openai_shape_and_the_server_goes_on(smollm2_llm, monkeypatch):
    from xllm.engine.output_processor import OutputProcessor
    from xllm.entrypoints.openai.server import ServerSettings, build_app

    engine = smollm2_llm.engine
    real = OutputProcessor._detokenize

    def detokenize(self, sample):
        if sample.request.params.max_tokens == 7:  # the doomed one
            raise RuntimeError("injected")
        return real(self, sample)

    monkeypatch.setattr(OutputProcessor, "_detokenize", detokenize)
    llm = AsyncLLM(engine, "m")
    with TestClient(build_app(llm, ServerSettings(model_name="m"))) as http:
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 7})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["code"] == "request_failed" and "injected" in error["message"] and error["type"] == "server_error"
        with http.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 7, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert '"request_failed"' in events[-2] and events[-1] == "data: [DONE]"  # in-band, then the end
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert http.get("/health").status_code == 200
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_streaming_a_long_generation_costs_o_tokens(smollm2_llm):
    """Outputs of a running request carry only their deltas; only the final one carries the whole
    text, tokens and logprobs. Counting what the outputs hold: O(tokens), not O(tokens^2)."""
    engine = smollm2_llm.engine
    n = 300
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=n, ignore_eos=True, logprobs=2, stop=["zzzz"])
    rid = engine.add_request("Write a long story about a dragon.", params)
    held = 0  # elements copied into the outputs, summed over the stream
    pieces, tokens, logprobs, final = [], [], [], None
    pending_chars = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            if out.finished:
                final = c
            else:
                held += len(c.token_ids) + len(c.text) + len(c.logprobs or [])
                assert not c.token_ids and not c.text and c.logprobs is None
            held += len(c.delta_token_ids) + len(c.delta_text) + len(c.delta_logprobs or [])
            pieces.append(c.delta_text)
            tokens += c.delta_token_ids
            logprobs += c.delta_logprobs or []
        group = engine.outputs.groups.get(rid)
        if group is not None:
            pending_chars.append(group.samples[0].detokenizer.pending_chars)
    assert final is not None and tokens == final.token_ids and len(tokens) == n
    assert "".join(pieces) == final.text and logprobs == final.logprobs
    assert held <= 3 * (n + len(final.text))  # each token, character and logprob entry handed over once
    assert max(pending_chars) <= 3 + 64  # the detokenizer keeps only the held-back tail (+ one step's text)


def test_a_slow_readers_stream_merges_in_place():
    """Unread outputs merge by appending to the unread deltas (the same list, extended), and text
    pieces are joined once when read."""

    def out(i, finished=False):
        c = CompletionOutput(0, "", [], "length" if finished else None, delta_text=f"t{i} ", delta_token_ids=[i],
                             delta_logprobs=[{i: None}])
        return RequestOutput("r", None, [1], [c], finished=finished)

    async def main():
        stream = _Stream(0.0, 1)
        first = out(0)
        stream.put(first)
        for i in range(1, 1000):
            stream.put(out(i, finished=i == 999))
        got = await stream.get()
        c = got.outputs[0]
        assert c.delta_token_ids is first.outputs[0].delta_token_ids  # extended in place, never copied
        assert c.delta_token_ids == list(range(1000)) and len(c.delta_logprobs) == 1000
        assert c.delta_text == "".join(f"t{i} " for i in range(1000)) and got.finished

    asyncio.run(main())
