"""`xllm bench serve`'s HTTP client and whole runs against a tiny fake OpenAI streaming server.

The fake server (aiohttp, on a free 127.0.0.1 port, in a thread of its own) streams one chunk per
`max_tokens` after a short delay each, the first chunk carrying two tokens' text and being split
across two writes, then a usage chunk and `data: [DONE]`. Path prefixes change its behaviour:
/nousage sends no usage chunk, /bad answers 400 with an OpenAI error body, /midfail sends an error
event after the first chunk.
"""

import argparse
import asyncio
import json
import socket
import threading
import time

import pytest
from aiohttp import web

from xllm.bench.results import read_json
from xllm.bench.serve import ServeBenchConfig, add_serve_args, cmd_serve, config_from_args, run_benchmark
from xllm.bench.serve_client import ServerClient
from xllm.bench.serve_report import format_report
from xllm.bench.serve_workload import BenchRequest

DELAY_S = 0.004  # before each text chunk
MODEL = "fake-model"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeServer:
    """An OpenAI-style streaming server that notes every body and header it receives."""

    def __init__(self):
        self.url = ""
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []

    def app(self) -> web.Application:
        app = web.Application()
        for prefix in ("", "/nousage", "/bad", "/midfail"):
            app.router.add_get(f"{prefix}/v1/models", self.models)
            app.router.add_post(f"{prefix}/v1/completions", self.generate)
            app.router.add_post(f"{prefix}/v1/chat/completions", self.generate)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if request.path.startswith("/bad"):
            error = {"message": "ignore_eos is not supported", "type": "invalid_request_error", "code": 400}
            return web.json_response({"error": error}, status=400)
        chat = "messages" in body
        n = body["max_tokens"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def event(payload: dict, split: bool = False) -> None:
            data = f"data: {json.dumps(payload)}\n\n".encode()
            if split:  # an event cut across two writes: the client must join the pieces
                await response.write(data[:9])
                await asyncio.sleep(DELAY_S)
                data = data[9:]
            await response.write(data)

        def chunk(text: str) -> dict:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return {"object": "chunk", "model": MODEL, "choices": [choice]}

        if chat:  # the role-only first chunk of chat streams carries no text
            await event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i in range(n - 1):  # n tokens in n - 1 chunks: the first carries two
            await asyncio.sleep(DELAY_S)
            await event(chunk(" tok tok" if i == 0 else " tok"), split=i == 0)
            if request.path.startswith("/midfail"):
                await event({"error": {"message": "boom", "code": 500}})
                return response
        await event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        if not request.path.startswith("/nousage"):
            prompt = body.get("prompt") or " ".join(m["content"] for m in body["messages"])
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
            await event({"choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture(scope="module")
def server():
    """The fake server, running in a thread until the module's tests end."""
    fake = FakeServer()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(fake.app())
        loop.run_until_complete(runner.setup())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        loop.run_until_complete(web.SockSite(runner, sock).start())
        fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield fake
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def send_one(url: str, request: BenchRequest, **config):
    """Open a client on `url` (model from /v1/models), stream `request`; return (record, model)."""

    async def go():
        async with ServerClient(url, "fake", ServeBenchConfig(**config)) as client:
            return await client.send(request, 0, time.perf_counter()), client.model

    return asyncio.run(go())


def test_streamed_completion_is_timed_and_counted(server):
    record, model = send_one(server.url, BenchRequest("one two three", 3, 6), api_key="secret")
    assert model == MODEL
    assert record.success and record.status == 200
    assert record.output_tokens == 6  # from the usage chunk, not the 5 text chunks
    assert record.prompt_tokens == 3
    assert len(record.chunk_s) == 5
    assert record.send_s < record.chunk_s[0] and record.chunk_s[-1] <= record.end_s
    assert record.ttft_s >= 2 * DELAY_S  # the first event came in two pieces
    assert record.e2e_s >= 6 * DELAY_S  # and four more events after a delay each
    assert len(record.itl_s) == 4 and all(gap >= 0 for gap in record.itl_s)  # (a busy client may read two at once)
    assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 5)
    body = server.bodies[-1]
    assert body == {
        "model": MODEL, "prompt": "one two three", "max_tokens": 6, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    assert server.auth[-1] == "Bearer secret"


def test_streamed_chat_with_a_shared_prefix(server):
    request = BenchRequest("a question", 5, 4, prefix="you are helpful")
    record, _ = send_one(server.url + "/v1/", request, endpoint="chat", ignore_eos=False)
    assert record.success and record.output_tokens == 4 and len(record.chunk_s) == 3  # role chunk: no text
    body = server.bodies[-1]
    assert body["messages"] == [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "a question"},
    ]
    assert "ignore_eos" not in body and server.auth[-1] is None


def test_without_usage_tokens_are_text_chunks(server):
    record, _ = send_one(server.url + "/nousage", BenchRequest("x y", 2, 5))
    assert record.success and record.output_tokens == 4 and record.prompt_tokens is None


def test_http_error_is_a_failed_record(server):
    record, _ = send_one(server.url + "/bad", BenchRequest("x", 1, 3))
    assert not record.success and record.status == 400
    assert record.error == "HTTP 400: ignore_eos is not supported"
    assert record.chunk_s == [] and record.ttft_s is None


def test_error_event_mid_stream_is_a_failed_record(server):
    record, _ = send_one(server.url + "/midfail", BenchRequest("x", 1, 3))
    assert not record.success and record.status == 200 and "boom" in record.error
    assert len(record.chunk_s) == 1


def test_unreachable_server_is_a_failed_record():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # a port nobody listens on

    async def go():
        async with ServerClient(f"http://127.0.0.1:{port}", "gone", ServeBenchConfig(), model="m") as client:
            return await client.send(BenchRequest("x", 1, 2), 0, time.perf_counter())

    record = asyncio.run(go())
    assert not record.success and record.status is None and "Connect" in record.error
    with pytest.raises(ValueError, match="cannot reach .*/v1/models"):  # no --model: the server is asked
        run_benchmark(ServeBenchConfig(base_urls=(f"http://127.0.0.1:{port}",), output="unused.json"))


def test_two_servers_one_failing_write_json_and_png(server, tmp_path):
    cfg = ServeBenchConfig(
        base_urls=(server.url, server.url + "/bad"), labels=("good", "bad"), num_prompts=4, input_len=5,
        output_len=4, max_concurrency=2, warmup=0, slo_ttft_ms=5000, slo_tpot_ms=5000,
        output=str(tmp_path / "out" / "serve.json"),
    )
    report = run_benchmark(cfg)
    assert set(report) == {"command", "config", "machine", "slo", "servers", "runs", "best_rate", "files"}
    assert [s["label"] for s in report["servers"]] == ["good", "bad"]
    good, bad = report["runs"]
    assert good["summary"]["completed"] == 4 and good["summary"]["failed"] == 0
    assert good["summary"]["meets_slo"] is True and good["summary"]["output_tokens"] == 16
    assert bad["summary"]["completed"] == 0 and bad["summary"]["failed"] == 4
    assert bad["summary"]["meets_slo"] is False
    assert all("HTTP 400" in r["error"] for r in bad["requests"])
    assert report["best_rate"]["good"]["rate"] == float("inf") and report["best_rate"]["bad"]["rate"] is None
    written = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert written["runs"][0]["request_rate"] == "inf"  # strict JSON: non-finite numbers as strings
    assert "requests" not in written["runs"][0] and written["files"] == report["files"]  # a summary
    assert written["runs"][0]["summary"]["completed"] == 4 and written["command"] == report["command"]
    assert report["files"]["raw"] == str(tmp_path / "out" / "raw" / "serve.json.gz")
    raw = read_json(report["files"]["raw"])  # every request, gzipped, beside the summary
    assert len(raw["runs"][0]["requests"]) == 4 and raw["runs"][0]["summary"] == written["runs"][0]["summary"]
    with open(report["files"]["plot"], "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    printed = format_report(report)
    assert "good" in printed and "bad" in printed and "no rate tried met the SLO" in printed


def test_failed_warm_up_stops_the_run(server, tmp_path):
    cfg = ServeBenchConfig(base_urls=(server.url + "/bad",), output=str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="warm-up request .* failed: HTTP 400.*--no-ignore-eos"):
        run_benchmark(cfg)


def test_cmd_serve_rate_sweep(server, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    out, plot, raw = tmp_path / "sweep.json", tmp_path / "plots" / "sweep.png", tmp_path / "elsewhere" / "sweep.json.gz"
    before = len(server.bodies)
    args = parser.parse_args([
        "--quick", "--base-url", server.url, "--label", "fake", "--rates", "40,80", "--slo-ttft-ms", "5000",
        "--slo-tpot-ms", "5000", "--dataset", "shared-prefix", "--endpoint", "chat", "--output", str(out),
        "--plot", str(plot), "--raw-output", str(raw),
    ])
    assert cmd_serve(args) == 0
    report = json.loads(out.read_text())
    assert [len(run["requests"]) for run in read_json(str(raw))["runs"]] == [8, 8]
    assert len(server.bodies) - before == 1 + 2 * 8  # one warm-up, then 8 requests at each of 2 rates
    assert [run["request_rate"] for run in report["runs"]] == [40, 80]
    assert report["best_rate"]["fake"]["rate"] == 80 and report["best_rate"]["fake"]["capped"]
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert "Highest request rate meeting the SLO" in printed and str(out) in printed


def test_automatic_sweep_stops_at_the_max_rate(server, tmp_path):
    cfg = ServeBenchConfig.create(
        quick=True, base_urls=(server.url,), sweep_auto=True, sweep_start_rate=20, sweep_max_rate=70,
        slo_tpot_ms=5000, output=str(tmp_path / "auto.json"), draw_plot=False,
    )
    report = run_benchmark(cfg)
    best = report["best_rate"][report["servers"][0]["label"]]
    assert [e["rate"] for e in best["evaluations"]] == [20, 40, 70]
    assert best["rate"] == 70 and best["capped"] and report["files"]["plot"] is None
    assert [run["point"] for run in report["runs"]] == [0, 1, 2]  # fresh prompts for each try


def test_flags_make_the_config():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert config_from_args(parser.parse_args([])) == ServeBenchConfig()
    cfg = config_from_args(parser.parse_args(["--sweep", "--base-url", "a", "--base-url", "b", "--no-ignore-eos"]))
    assert cfg.request_rates == (1, 2, 4, 8) and cfg.base_urls == ("a", "b") and not cfg.ignore_eos
    assert config_from_args(parser.parse_args(["--request-rate", "inf"])).request_rates == (float("inf"),)
    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["--request-rate", "2", "--rates", "1,2"]))
    with pytest.raises(ValueError, match="SLO"):
        run_benchmark(config_from_args(parser.parse_args(["--sweep-auto"])))
    with pytest.raises(ValueError, match="label"):
        run_benchmark(config_from_args(parser.parse_args(["--base-url", "a", "--base-url", "b", "--label", "x"])))


def test_prefix_cache_counters_from_prometheus_text():
    from xllm.bench.serve_stats import prefix_cache_counters

    xllm_text = (
        "# TYPE xllm:prefix_cache_queries counter\n"
        'xllm:prefix_cache_queries_total{model_name="m"} 100.0\n'
        "# TYPE xllm:prefix_cache_hits counter\n"
        'xllm:prefix_cache_hits_total{model_name="m"} 64.0\n'
    )
    assert prefix_cache_counters(xllm_text) == (100.0, 64.0)
    vllm_text = xllm_text.replace("xllm:", "vllm:").replace('model_name="m"', 'engine="0",model_name="m"')
    assert prefix_cache_counters(vllm_text) == (100.0, 64.0)
    assert prefix_cache_counters("# TYPE other counter\nother_total 3.0\n") is None
    assert prefix_cache_counters("{{{ not prometheus") is None
