"""`xllm serve` with worker ranks: tensor parallelism over 2 ranks serves the default model with
TP = 1's greedy text; a rank killed mid-step (SIGKILL) fails the request in flight with a clear
error, turns /health to 503 and stops the other rank, and nothing hangs; the ranks of two "nodes"
started as separate commands (`--nnodes 2 --node-rank 0|1 --dist-init-addr`) serve the same text."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from xllm import SamplingParams
from xllm.bench.launch import free_port, launch_xllm

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:"]


def _children(pid: int) -> list[int]:
    """Worker-rank processes started by `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == pid and b"xllm.executor.worker_process" in cmdline:
            found.append(int(entry))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def reference_texts(smollm2_llm):
    params = SamplingParams(max_tokens=24, temperature=0)
    return [o.outputs[0].text for o in smollm2_llm.generate(PROMPTS, params)]


def _completions(server, prompt: str) -> str:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 24, "temperature": 0}
    r = httpx.post(server.v1 + "/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_tp2_serves_identical_text_and_a_killed_rank_fails_cleanly(tmp_path, reference_texts):
    args = ("--tensor-parallel-size", "2", "--kv-cache-memory", "0.25", "--served-model-name", "smollm2")
    with launch_xllm(str(tmp_path), *args) as server:
        assert [_completions(server, p) for p in PROMPTS] == reference_texts
        ranks = _children(server.process.pid)
        assert len(ranks) == 2, ranks

        lines: list[str] = []
        started = threading.Event()
        body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True, "stream": True}

        def stream():
            try:
                with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        lines.append(line)
                        if len(lines) > 5:
                            started.set()
            except httpx.HTTPError as exc:
                lines.append(f"transport error: {exc!r}")
            started.set()

        thread = threading.Thread(target=stream)
        thread.start()
        assert started.wait(60)
        os.kill(ranks[-1], signal.SIGKILL)  # mid-step: tokens are streaming
        thread.join(30)
        assert not thread.is_alive(), "the stream hangs after a rank died"
        errors = [line for line in lines if line.startswith("data: {") and '"error"' in line]
        assert len(errors) == 1 and "died" in errors[0] and "engine_dead" in errors[0], lines[-6:]
        assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health still answers 200"
            time.sleep(0.2)
        r = httpx.post(server.v1 + "/completions", json={"model": "smollm2", "prompt": "hi", "max_tokens": 4}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        deadline = time.monotonic() + 10
        while _alive(ranks[0]):  # the surviving rank is stopped, not left waiting in a collective
            assert time.monotonic() < deadline, "the other rank is still running"
            time.sleep(0.2)
        assert server.process.poll() is None  # the server itself is up, answering with errors
    assert server.process.returncode is not None


def test_ranks_of_two_nodes_started_as_separate_commands(tmp_path, reference_texts):
    port = free_port()  # the process group meets here; node 0's engine listens on port + 1
    common = ["--tensor-parallel-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{port}"]
    with open(tmp_path / "node1.log", "w") as log:
        node1 = subprocess.Popen([sys.executable, "-m", "xllm.entrypoints.cli", "serve", *common, "--node-rank", "1",
                                  "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        with launch_xllm(str(tmp_path), *common, "--node-rank", "0", "--kv-cache-memory", "0.25",
                         "--served-model-name", "smollm2", threads=1) as server:
            assert [_completions(server, p) for p in PROMPTS] == reference_texts
            assert len(_children(server.process.pid)) == 1 and len(_children(node1.pid)) == 1
        # node 0 stopped: node 1's rank loses its engine and the node's command ends
        assert node1.wait(60) == 0 or node1.returncode is not None
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
