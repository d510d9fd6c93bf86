"""AsyncLLM: stream merging for slow readers, abort on early exit, and a dead engine loop."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from xllm.engine.async_llm import AsyncLLM, EngineDeadError, _Stream
from xllm.outputs import CompletionOutput, RequestOutput
from xllm.sampling_params import SamplingParams


def _out(text: str, ids: list[int], finished: bool = False) -> RequestOutput:
    c = CompletionOutput(0, text, ids, finish_reason="length" if finished else None, delta_text=text[-1:], delta_token_ids=ids[-1:])
    return RequestOutput("r", None, [1], [c], finished=finished)


def test_unread_outputs_merge_for_a_slow_reader():
    async def main():
        stream = _Stream(0.0, 1)
        stream.put(_out("a", [1]))
        stream.put(_out("ab", [1, 2]))
        stream.put(_out("abc", [1, 2, 3], finished=True))
        out = await stream.get()
        assert out.finished and out.outputs[0].delta_text == "abc" and out.outputs[0].delta_token_ids == [1, 2, 3]
        stream.put(RuntimeError("boom"))
        stream.put(_out("x", [4]))  # an error is final: later outputs do not hide it
        with pytest.raises(RuntimeError):
            await stream.get()

    asyncio.run(main())


@pytest.fixture(scope="module")
def engine():
    from xllm.config import EngineConfig
    from xllm.engine.engine import LLMEngine

    return LLMEngine(EngineConfig.create(dtype="float32", kv_cache_memory_gib=0.1))


@pytest.mark.slow
def test_generate_streams_and_early_exit_aborts(engine):
    async def main():
        llm = AsyncLLM(engine, "m")
        llm.start()
        ids = engine.tokenizer.encode("Hello there")
        texts = [o.outputs[0].delta_text async for o in llm.generate(ids, SamplingParams(temperature=0, max_tokens=5), "a")]
        assert len(texts) >= 1
        async for _ in llm.generate(ids, SamplingParams(max_tokens=1000, ignore_eos=True), "b"):
            break  # the consumer leaves: the request is aborted and its blocks freed
        for _ in range(100):
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        assert not engine.has_unfinished_requests() and engine.kv.usage() == 0
        await llm.shutdown()

    asyncio.run(main())


@pytest.mark.slow
def test_a_dead_engine_loop_fails_health_and_requests(engine, monkeypatch):
    from xllm.entrypoints.openai.server import ServerSettings, build_app

    llm = AsyncLLM(engine, "m")
    with TestClient(build_app(llm, ServerSettings(model_name="m"))) as http:
        assert http.get("/health").status_code == 200

        def broken_step():
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine, "step", broken_step)
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 503
    with pytest.raises(EngineDeadError):
        asyncio.run(anext(llm.generate([1], SamplingParams(), "late")))
