"""The HTTP client of `xllm bench serve`: request bodies, SSE parsing, one server's session,
streamed requests timed as a client sees them (serve.py drives it)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from xllm.bench.serve_stats import RequestRecord, prefix_cache_counters
from xllm.bench.serve_workload import ENDPOINTS, BenchRequest

if TYPE_CHECKING:
    from xllm.bench.serve import ServeBenchConfig

def request_body(endpoint: str, model: str, request: BenchRequest, ignore_eos: bool) -> dict:
    """The JSON body of a streamed, greedy OpenAI request that asks for the usage at the end."""
    body: dict = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        system = [{"role": "system", "content": request.prefix}] if request.prefix else []
        body["messages"] = [*system, {"role": "user", "content": request.text}]
    else:
        body["prompt"] = f"{request.prefix} {request.text}" if request.prefix else request.text
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def chunk_text(payload: dict) -> str:
    """The text a streamed completion or chat chunk carries ("" for role-only and usage chunks)."""
    choices = payload.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta")
    if delta is not None:  # chat; reasoning models stream their thinking separately
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choices[0].get("text") or ""


def error_message(body: str | dict, status: int | None = None) -> str:
    """One line from an error body: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the text."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            pass
    message = body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message", error)
        else:
            message = error or body.get("message") or body.get("detail") or body
    text = " ".join(str(message).split())
    return (f"HTTP {status}: {text}" if status is not None else text)[:500]


async def sse_data(content: aiohttp.StreamReader) -> AsyncIterator[tuple[float, str]]:
    """(arrival time by time.perf_counter, payload) of each `data:` line of a server-sent event stream."""
    buffer = b""
    async for chunk in content.iter_any():
        now = time.perf_counter()
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield now, line[5:].strip().decode()
    if buffer.startswith(b"data:"):
        yield time.perf_counter(), buffer[5:].strip().decode()


def default_label(base_url: str) -> str:
    """A server's name from its URL: host:port, plus the path when there is one."""
    parts = urlsplit(base_url)
    return (parts.netloc + parts.path.rstrip("/")) or base_url


def normalize_base_url(base_url: str) -> str:
    """The URL without a trailing slash or /v1, which both spellings of a base URL may carry."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class ServerClient:
    """One OpenAI-compatible server: its label, URL, model and HTTP session (an async context manager)."""

    def __init__(self, base_url: str, label: str, cfg: ServeBenchConfig, model: str | None = None):
        self.base_url = normalize_base_url(base_url)
        self.label = label
        self.model = model
        self.cfg = cfg
        self.url = self.base_url + ENDPOINTS[cfg.endpoint]
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Open the session (no connection limit) and find the model name if none was given."""
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        self.session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
        )
        try:
            if self.model is None:
                self.model = await self.first_model()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the session (if open)."""
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def __aenter__(self) -> ServerClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def prefix_cache_counters(self) -> tuple[float, float] | None:
        """(prompt tokens queried, tokens hit) from the server's Prometheus /metrics: xLLM's and
        vLLM's `*:prefix_cache_queries` / `*:prefix_cache_hits` counters; None if it has neither."""
        assert self.session is not None
        try:
            async with self.session.get(self.base_url + "/metrics") as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        return prefix_cache_counters(text)

    async def first_model(self) -> str:
        """The first model id that GET /v1/models lists; ValueError when the server cannot tell."""
        assert self.session is not None
        url = self.base_url + "/v1/models"
        try:
            async with self.session.get(url) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise ValueError(f"{self.label}: GET {url} failed: {error_message(text, resp.status)}")
                return json.loads(text)["data"][0]["id"]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ValueError(f"{self.label}: cannot reach {url} ({type(exc).__name__}: {exc}); is the server up?") from None
        except (LookupError, TypeError, json.JSONDecodeError):
            raise ValueError(f"{self.label}: GET {url} lists no model; pass --model") from None

    async def send(self, request: BenchRequest, index: int, run_start: float) -> RequestRecord:
        """Stream one request; the record's times are from `run_start` (time.perf_counter). Never raises
        for a failed request: its record carries the error."""
        assert self.session is not None and self.model is not None
        body = request_body(self.cfg.endpoint, self.model, request, self.cfg.ignore_eos)
        start = time.perf_counter()
        record = RequestRecord(index, request.input_len, request.output_len, send_s=start - run_start, end_s=0.0)
        usage: dict | None = None
        try:
            async with self.session.post(self.url, json=body) as resp:
                record.status = resp.status
                if resp.status != 200:
                    record.error = error_message(await resp.text(), resp.status)
                else:
                    async for arrival, data in sse_data(resp.content):
                        if data == "[DONE]":
                            break
                        payload = json.loads(data)
                        if payload.get("error"):
                            record.error = error_message(payload)
                            break
                        if chunk_text(payload):
                            record.chunk_s.append(arrival - run_start)
                        usage = payload.get("usage") or usage
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        record.end_s = time.perf_counter() - run_start
        if record.error is None and not record.chunk_s:
            record.error = "the stream carried no text"
        record.output_tokens = usage["completion_tokens"] if usage else len(record.chunk_s)
        record.prompt_tokens = usage.get("prompt_tokens") if usage else None
        return record

    async def run_load(
        self, requests: Sequence[BenchRequest], offsets: Sequence[float], max_concurrency: int | None
    ) -> tuple[list[RequestRecord], float]:
        """Send request i at offsets[i] seconds (waiting for a free slot when `max_concurrency` are in
        flight); return the records and the seconds from the start to the end of the last request."""
        slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        start = time.perf_counter()

        async def one(index: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offsets[index] - time.perf_counter()))
            if slots is None:
                return await self.send(requests[index], index, start)
            async with slots:
                return await self.send(requests[index], index, start)

        records = await asyncio.gather(*(one(i) for i in range(len(requests))))
        return list(records), time.perf_counter() - start

    async def warm_up(self, requests: Sequence[BenchRequest]) -> None:
        """Send `requests` one after another, untimed; ValueError when one fails (the server or the
        flags are wrong, and every timed request would fail the same way)."""
        for request in requests:
            record = await self.send(request, 0, time.perf_counter())
            if not record.success:
                hint = " (pass --no-ignore-eos if the server rejects ignore_eos)" if self.cfg.ignore_eos else ""
                raise ValueError(f"{self.label}: warm-up request to {self.url} failed: {record.error}{hint}")
