"""The real `xllm serve` on SmolLM2, through the official openai client, LangChain and raw HTTP.

Greedy outputs are compared with the offline `LLM` on the same model and precision (float32).
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from xllm import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "The three primary colors are"]
CHAT = [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0)


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics as name{labels} -> value, parsed with prometheus_client."""
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def test_models_health_version(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_completions_match_offline_and_usage_is_exact(server, smollm2_llm):
    c = client(server)
    tokenizer = smollm2_llm.get_tokenizer()
    offline = smollm2_llm.generate(PROMPTS, GREEDY)
    for prompt, ref in zip(PROMPTS, offline):
        out = c.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0)
        assert out.choices[0].text == ref.outputs[0].text
        assert out.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_matches_offline(server, smollm2_llm):
    ref = smollm2_llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    out = client(server).chat.completions.create(model="smollm2", messages=CHAT, max_completion_tokens=24, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == len(ref.token_ids)


def test_streamed_text_equals_non_streamed(server):
    c = client(server)
    full = c.completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    chunks = list(c.completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason

    full = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert all(ch.usage is None for ch in chunks)  # not asked for


def test_n2_samples(server):
    c = client(server)
    out = c.completions.create(model="smollm2", prompt=PROMPTS[2], n=2, max_tokens=12, temperature=0.9, seed=7)
    assert sorted(ch.index for ch in out.choices) == [0, 1]
    again = c.completions.create(model="smollm2", prompt=PROMPTS[2], n=2, max_tokens=12, temperature=0.9, seed=7)
    assert [ch.text for ch in again.choices] == [ch.text for ch in out.choices]  # seeded
    chat = c.chat.completions.create(model="smollm2", messages=CHAT, n=2, max_tokens=8, temperature=0.9, seed=3)
    assert sorted(ch.index for ch in chat.choices) == [0, 1]
    assert chat.usage.completion_tokens <= 16
    streamed = list(c.chat.completions.create(model="smollm2", messages=CHAT, n=2, max_tokens=8, temperature=0.9, seed=3, stream=True))
    for i in range(2):
        text = "".join(c.delta.content or "" for ch in streamed for c in ch.choices if c.index == i)
        assert text == chat.choices[i].message.content


def test_completion_logprobs_and_echo(server, smollm2_llm):
    c = client(server)
    out = c.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert math.isclose(max(top.values()), chosen, abs_tol=1e-5)  # greedy: the chosen token is the top one
    # Scoring a prompt, as lm-eval's loglikelihood does: echo, logprobs, max_tokens=0.
    scored = c.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1, temperature=0)
    s = scored.choices[0]
    ref = smollm2_llm.generate(PROMPTS[0], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    assert s.text == PROMPTS[0] and scored.usage.completion_tokens == 0
    assert s.logprobs.token_logprobs[0] is None
    assert len(s.logprobs.token_logprobs) == len(ref.prompt_token_ids)
    for tid, got, want in zip(ref.prompt_token_ids[1:], s.logprobs.token_logprobs[1:], ref.prompt_logprobs[1:]):
        assert math.isclose(got, want[tid].logprob, abs_tol=1e-4)


def test_chat_logprobs(server):
    out = client(server).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token
        assert bytes(item.bytes).decode() == item.token


def test_prompt_lists_and_token_ids(server, smollm2_llm):
    c = client(server)
    tokenizer = smollm2_llm.get_tokenizer()
    out = c.completions.create(model="smollm2", prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    assert [ch.index for ch in sorted(out.choices, key=lambda ch: ch.index)] == [0, 1]
    ids = tokenizer.encode(PROMPTS[0])
    by_ids = c.completions.create(model="smollm2", prompt=ids, max_tokens=8, temperature=0)
    first = next(ch for ch in out.choices if ch.index == 0)
    assert by_ids.choices[0].text == first.text
    assert out.usage.prompt_tokens == len(ids) + len(tokenizer.encode(PROMPTS[1]))


def test_32_concurrent_streams_are_independent(server, smollm2_llm):
    prompts = [f"Fact number {i}: the {w} is" for i, w in enumerate(["sun", "moon", "sea", "sky"] * 8)]
    expected = [o.outputs[0].text for o in smollm2_llm.generate(prompts, GREEDY)]
    aclient = openai.AsyncOpenAI(base_url=server.v1, api_key="none", max_retries=0)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stream=True)
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    assert asyncio.run(all_of_them()) == expected


def test_langchain_chat_openai(server, smollm2_llm):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.v1, api_key="none", model="smollm2", temperature=0, max_tokens=16, max_retries=0)
    ref = smollm2_llm.chat([{"role": "user", "content": "Name three fruits."}], SamplingParams(temperature=0.0, max_tokens=16))
    assert llm.invoke("Name three fruits.").content == ref[0].outputs[0].text
    assert "".join(chunk.content for chunk in llm.stream("Name three fruits.")) == ref[0].outputs[0].text


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "smollm2", "prompt": "Count: 1 2 3", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.v1 + "/completions", json=body) as response:
            lines = response.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert metrics(server)["xllm:num_requests_running"] == 1
            assert metrics(server)["xllm:kv_cache_usage_perc"] > 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["xllm:num_requests_running"] == 0 and m["xllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.05)
    assert m["xllm:num_requests_running"] == 0 and m["xllm:kv_cache_usage_perc"] == 0
    assert m["xllm:request_success_total{finished_reason=abort}"] >= 1


def test_metrics_parse_and_count(server):
    before = metrics(server)
    out = client(server).completions.create(model="smollm2", prompt=PROMPTS[3], max_tokens=5, temperature=0)
    after = metrics(server)
    assert after["xllm:prompt_tokens_total"] - before.get("xllm:prompt_tokens_total", 0) == out.usage.prompt_tokens
    assert after["xllm:generation_tokens_total"] - before.get("xllm:generation_tokens_total", 0) == 5
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert after[f"xllm:{name}_count"] > before.get(f"xllm:{name}_count", 0), name
    for name in ("num_requests_waiting", "num_preemptions_total"):
        assert f"xllm:{name}" in after


def test_prefix_cache_hits_show_in_usage_and_metrics(server):
    c = client(server)
    system = "You are a museum guide who knows every painting in the east wing by heart. " * 6
    first = c.chat.completions.create(
        model="smollm2", messages=[{"role": "system", "content": system}, {"role": "user", "content": "Who painted it?"}],
        max_tokens=4, temperature=0,
    )
    before = metrics(server)
    second = c.chat.completions.create(
        model="smollm2", messages=[{"role": "system", "content": system}, {"role": "user", "content": "When was it made?"}],
        max_tokens=4, temperature=0,
    )
    after = metrics(server)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= second.usage.prompt_tokens - 32 and cached % 16 == 0  # all but the question's blocks
    assert after["xllm:prefix_cache_hits_total"] - before["xllm:prefix_cache_hits_total"] == cached
    assert after["xllm:prefix_cache_queries_total"] - before["xllm:prefix_cache_queries_total"] == second.usage.prompt_tokens
    # Another tenant's salt finds nothing; the streamed usage chunk reports the same field.
    stream = c.chat.completions.create(
        model="smollm2", messages=[{"role": "system", "content": system}, {"role": "user", "content": "Who painted it?"}],
        max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"cache_salt": "tenant-b"},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage[-1].prompt_tokens_details.cached_tokens == 0


def test_timeout_ends_a_request_and_priority_is_accepted(server):
    body = {"model": "smollm2", "prompt": "Count: 1 2 3", "max_tokens": 2000, "ignore_eos": True, "timeout": 0.5}
    start = time.monotonic()
    out = _post(server, "/v1/completions", body).json()
    assert time.monotonic() - start < 5
    assert out["choices"][0]["finish_reason"] == "timeout" and 0 < out["usage"]["completion_tokens"] < 2000
    ok = _post(server, "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "priority": -3}).json()
    assert ok["usage"]["completion_tokens"] == 2


def _post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30, **kw)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(
    "path,body,status,param,fragment",
    [
        ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "gpt-4"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", "temperature"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens", "context length"),
        ("/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n", "n must be"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "top_p"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", "logprobs"),
        ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "suffix"),
        ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search", "beam search"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "prompt", "out of range"),
        ("/v1/completions", {"temperature": 0}, 400, "prompt", "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools", "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400, "response_format", "response_format"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
        ("/v1/completions", {"prompt": "hi", "cache_salt": ""}, 400, "cache_salt", "cache_salt"),
        ("/v1/completions", {"prompt": "hi", "timeout": 0}, 400, "timeout", "timeout"),
        ("/v1/completions", {"prompt": "hi", "priority": "urgent"}, 400, "priority", "priority"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "cache_salt": 7}, 400, "cache_salt", "cache_salt"),
    ],
)
def test_error_cases(server, path, body, status, param, fragment):
    err = _error(_post(server, path, body), status)
    assert err["param"] == param
    assert fragment in err["message"]


def test_prompt_over_context_names_both_lengths(server):
    err = _error(_post(server, "/v1/completions", {"prompt": list(range(100, 9100)), "max_tokens": 1}), 400)
    assert "9000" in err["message"] and "8192" in err["message"]


def test_unknown_route_and_method_use_the_error_shape(server):
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    _error(httpx.get(server.url + "/v1/completions"), 405)


def test_tokenize_detokenize(server, smollm2_llm):
    tokenizer = smollm2_llm.get_tokenizer()
    r = _post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert _post(server, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    chat = _post(server, "/tokenize", {"messages": CHAT}).json()["tokens"]
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert chat == tokenizer.encode(text, add_special_tokens=False)
    _error(_post(server, "/detokenize", {"tokens": [-1]}), 400)


def test_access_log_line(server):
    client(server).completions.create(model="smollm2", prompt="Hi there", max_tokens=3, temperature=0)
    time.sleep(0.2)
    assert any(
        "POST /v1/completions 200" in line and "output_tokens=3" in line and "id=cmpl-" in line
        for line in server.log().splitlines()
    )
