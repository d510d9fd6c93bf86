"""Servers of their own: API key, body limit, waiting-queue bound (503), SIGTERM and the grace period."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import httpx
import pytest

from xllm.bench.launch import launch_xllm

pytestmark = pytest.mark.slow

LONG = {"prompt": "Count: 1 2 3", "max_tokens": 3000, "ignore_eos": True, "stream": True}


def _gauge(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_api_key_body_limit_and_queue_bound(tmp_path):
    args = ("--api-key", "s3cret", "--max-request-bytes", "4096", "--max-num-seqs", "1", "--max-waiting-requests", "1")
    with launch_xllm(str(tmp_path), "--kv-cache-memory", "0.25", *args) as server:
        url = server.v1 + "/completions"
        auth = {"Authorization": "Bearer s3cret"}
        small = {"prompt": "Hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url, json=small, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.v1 + "/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # only /v1 needs the key
        assert httpx.post(url, json=small, headers=auth).status_code == 200

        r = httpx.post(url, json={"prompt": "x" * 5000}, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: the limit holds while reading
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = httpx.post(url, content=chunked(), headers={**auth, "content-type": "application/json"})
        assert r.status_code == 413

        # One running (max_num_seqs 1), one waiting (the bound): the next gets 503.
        with httpx.Client(timeout=60, headers=auth) as http:
            with http.stream("POST", url, json=LONG) as first:
                first_lines = first.iter_lines()  # keep it: a dropped iterator closes the response
                next(first_lines)
                with http.stream("POST", url, json=LONG) as second:
                    assert second.status_code == 200
                    deadline = time.monotonic() + 10
                    while _gauge(server, "xllm:num_requests_waiting") < 1 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    r = httpx.post(url, json=small, headers=auth)
                    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        deadline = time.monotonic() + 10  # both streams were dropped: their requests end
        while _gauge(server, "xllm:num_requests_running") + _gauge(server, "xllm:num_requests_waiting") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(url, json=small, headers=auth).status_code == 200


def test_the_waiting_bound_is_exact_under_a_burst(tmp_path):
    """A burst of streaming requests arrives together while the one slot is taken: exactly the bound
    is accepted (each check and its reservation happen in one turn of the event loop), the rest
    get 503, and once they end the count is back to zero."""
    import asyncio

    bound, burst = 3, 10
    with launch_xllm(str(tmp_path), "--kv-cache-memory", "0.25", "--max-num-seqs", "1", "--max-waiting-requests",
                     str(bound)) as server:
        url = server.v1 + "/completions"

        async def main():
            async with httpx.AsyncClient(timeout=120) as http:
                async with http.stream("POST", url, json=LONG) as first:
                    lines = first.aiter_lines()
                    await anext(lines)  # running: the only slot is taken from here on

                    async def one():
                        async with http.stream("POST", url, json={**LONG, "max_tokens": 50}) as r:
                            return r.status_code

                    return await asyncio.gather(*(one() for _ in range(burst)))

        codes = asyncio.run(main())
        assert sorted(codes) == [200] * bound + [503] * (burst - bound), codes
        deadline = time.monotonic() + 20
        while _gauge(server, "xllm:num_requests_running") + _gauge(server, "xllm:num_requests_waiting") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gauge(server, "xllm:num_requests_waiting") == 0
        assert httpx.post(url, json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def _stream_in_thread(url: str, body: dict, lines: list[str], started: threading.Event) -> threading.Thread:
    def run():
        try:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
        except httpx.HTTPError as exc:
            lines.append(f"error: {exc!r}")
        started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_finishes_in_flight_requests_then_exits_0(tmp_path):
    with launch_xllm(str(tmp_path), "--kv-cache-memory", "0.25") as server:
        lines: list[str] = []
        started = threading.Event()
        body = {**LONG, "max_tokens": 150}
        thread = _stream_in_thread(server.v1 + "/completions", body, lines, started)
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(server.url + "/health", timeout=5)
        thread.join(120)
        assert server.process.wait(60) == 0
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert sum('"text"' in line for line in data) >= 100  # every token arrived (a few may share an event)
    assert '"finish_reason":"length"' in data[-2]


def test_grace_period_bounds_shutdown(tmp_path):
    with launch_xllm(str(tmp_path), "--kv-cache-memory", "0.25", "--shutdown-grace", "1") as server:
        lines: list[str] = []
        started = threading.Event()
        thread = _stream_in_thread(server.v1 + "/completions", LONG, lines, started)  # would run for minutes
        assert started.wait(60)
        begin = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            assert server.process.wait(30) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not exit after its grace period")
        assert time.monotonic() - begin < 15
        thread.join(30)
