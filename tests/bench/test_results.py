"""Where benchmark results go: summaries beside an ignored raw/ folder of gzipped per-request data."""

import gzip
import json
import os

from xllm.bench.results import command_line, raw_dir, raw_path, read_json, write_raw, write_summary


def test_raw_paths_mirror_the_summaries():
    raw = os.path.join("benchmarks", "results", "raw")
    assert raw_path("benchmarks/results/serve-1.json") == os.path.join(raw, "serve-1.json.gz")
    assert raw_dir("benchmarks/results/peers-1/") == os.path.join(raw, "peers-1")


def test_command_line_is_a_pasteable_shell_line():
    script = command_line(["benchmarks/peers/compare.py", "--rates", "0.3,1"])
    assert script == "python benchmarks/peers/compare.py --rates 0.3,1"
    assert command_line(["/usr/bin/xllm", "bench", "serve", "--label", "a b"]) == "xllm bench serve --label 'a b'"
    assert command_line([os.path.abspath("xllm/entrypoints/cli.py"), "bench", "offline"]) == "xllm bench offline"


def test_summary_is_indented_json_and_raw_is_compact_gzip(tmp_path):
    data = {"rate": float("inf"), "requests": [{"ttft_ms": 1.5}] * 3}
    summary = write_summary(str(tmp_path / "a" / "s.json"), data)
    raw = write_raw(raw_path(summary), data)
    assert read_json(summary) == read_json(raw) == {**data, "rate": "inf"}  # strict JSON: inf as a string
    with gzip.open(raw, "rt") as f:
        assert " " not in f.read()  # compact separators
    assert json.loads((tmp_path / "a" / "s.json").read_text())["rate"] == "inf"
