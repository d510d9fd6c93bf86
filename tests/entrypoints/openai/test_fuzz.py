"""Hostile bodies: a few hundred malformed requests, then a normal one must still be answered right.

Every answer must be a 2xx or a 4xx in the OpenAI error shape; never a 5xx, never a dead engine.
"""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest

from xllm import SamplingParams

pytestmark = pytest.mark.slow

NASTY_VALUES = [
    None, True, False, -1, 0, 1, 2**31, 2**64, 10**100, -(10**100), 1e308, -1e308, 1e-300, 0.5,
    "", "x", "\x00", "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "💥" * 50, "a" * 20_000,
    [], [1, 2], [-1], [None], ["a", 3], [[1], ["x"]], {}, {"a": 1}, {"1": "x"}, {"99999999": 5}, [[[[[]]]]],
]
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "logit_bias",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
    "user", "best_of", "skip_special_tokens", "response_format", "tools",
]
RAW_BODIES = [
    b"", b"null", b"42", b'"text"', b"[]", b"{", b'{"prompt": }', b'{"prompt": "a",}', b"\xff\xfe\xfd",
    b'{"prompt": "\xc3\x28"}', b'{"prompt": NaN}', b'{"prompt": "a", "temperature": Infinity}',
    b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b'{"prompt": "a"}' * 3, b"\x00" * 100,
]


def _bodies(rng: random.Random, count: int):
    for raw in RAW_BODIES:
        yield "/v1/completions", raw
        yield "/v1/chat/completions", raw
    for _ in range(count):
        chat = rng.random() < 0.5
        body = {"model": "smollm2", "max_tokens": 2}
        body.update({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"})
        for _ in range(rng.randint(1, 3)):
            field = rng.choice(FIELDS)
            if field in ("max_tokens", "max_completion_tokens", "min_tokens", "n"):
                # Keep the valid cases short: a large valid value (or null: up to the context limit)
                # would just be a long, legal request.
                value = rng.choice([v for v in NASTY_VALUES if v is not None and not (type(v) is int and 2 < v < 10**6)])
            else:
                value = rng.choice(NASTY_VALUES)
            body[field] = value
        if rng.random() < 0.1:
            body["messages"] = [{"role": rng.choice(["user", "tool", 3, None]), "content": rng.choice(NASTY_VALUES)}]
        yield ("/v1/chat/completions" if chat else "/v1/completions"), json.dumps(body).encode()


def test_hostile_bodies_never_break_the_server(server, smollm2_llm):
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + 120
    sent = 0
    with httpx.Client(timeout=60) as http:
        for path, raw in _bodies(rng, 300):
            r = http.post(server.url + path, content=raw, headers={"content-type": "application/json"})
            sent += 1
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:500])
            if r.status_code >= 400:
                err = r.json()["error"]
                assert err["message"] and err["type"], r.text
            if time.monotonic() > deadline:
                break
        r = http.post(server.url + "/v1/completions", content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"})
        assert r.status_code == 413
    assert sent >= 200 and statuses.get(400, 0) > 100, statuses
    assert httpx.get(server.url + "/health").status_code == 200
    ref = smollm2_llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0].text
    out = httpx.post(server.v1 + "/completions", json={"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}).json()
    assert out["choices"][0]["text"] == ref
