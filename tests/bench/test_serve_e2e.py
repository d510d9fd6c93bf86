"""`xllm bench serve` end to end against the real `xllm serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from xllm.bench.results import read_json

pytestmark = pytest.mark.slow


def test_bench_serve_against_our_server(server, tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "xllm.entrypoints.cli", "bench", "serve", "--base-url", server.url, "--label", "xllm",
           "--num-prompts", "6", "--input-len", "24", "--output-len", "8", "--max-concurrency", "3",
           "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    (run,) = read_json(report["files"]["raw"])["runs"]  # the raw file holds every request
    s = run["summary"]
    assert s["completed"] == 6 and s["failed"] == 0
    assert all(r["output_tokens"] == 8 for r in run["requests"])  # ignore_eos honoured, usage read
    assert all(20 <= r["prompt_tokens"] <= 32 for r in run["requests"])
    assert 0 < s["ttft_ms"]["median"] <= s["e2e_ms"]["median"]
    assert s["output_throughput"] > 0 and s["meets_slo"] is True
    assert report["servers"][0]["model"] == "smollm2"
    assert report["command"].startswith("xllm bench serve --base-url ")  # the command that made the run
    assert os.path.getsize(report["files"]["plot"]) > 1000
