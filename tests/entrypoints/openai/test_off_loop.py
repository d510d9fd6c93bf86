"""Tokenizer work for /tokenize, /detokenize and echo runs in worker threads, not on the event loop."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from xllm.engine.async_llm import AsyncLLM

pytestmark = pytest.mark.slow


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def test_tokenizer_work_leaves_the_event_loop(smollm2_llm, monkeypatch):
    from xllm.entrypoints.openai.server import ServerSettings, build_app

    engine = smollm2_llm.engine
    tokenizer = engine.tokenizer
    seen = []
    for name in ("encode", "decode", "apply_chat_template"):
        real = getattr(tokenizer, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, on_event_loop()))
            return _real(*args, **kwargs)

        monkeypatch.setattr(tokenizer, name, spy)
    engine.outputs._token_text.clear()  # echo's token texts are decoded afresh
    with TestClient(build_app(AsyncLLM(engine, "m"), ServerSettings(model_name="m"))) as http:
        assert http.post("/tokenize", json={"prompt": "Hello world"}).status_code == 200
        assert http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
        assert http.post("/detokenize", json={"tokens": [1, 2, 3]}).status_code == 200
        r = http.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "The sky is"
        with http.stream("POST", "/v1/completions", json={"prompt": "The sea is", "max_tokens": 2, "echo": True,
                                                          "logprobs": 1, "stream": True}) as s:
            assert s.status_code == 200 and list(s.iter_lines())
    names = {name for name, _ in seen}
    assert {"encode", "decode", "apply_chat_template"} <= names
    assert not [call for call in seen if call[1]], seen  # none ran on the event loop
