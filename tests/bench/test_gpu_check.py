"""benchmarks/gpu/check.sh --dry-run: the GPU check's steps on the CPU, so the script is known to
work before it meets a GPU (its CUDA tests are skipped here; the benchmark runs a tiny shape)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_check_sh_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skipped" in (tmp_path / "cuda-tests.txt").read_text()  # collected and skipped: no GPU here
    report = json.loads((tmp_path / "gpu-decode.json").read_text())
    assert set(report["engines"]) == {"xLLM", "transformers"} and report["ratios"]["batch1_speedup"] > 0
    assert "xLLM / transformers" in (tmp_path / "gpu-decode.txt").read_text()
