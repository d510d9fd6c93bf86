import subprocess
import sys

import pytest

from xllm.entrypoints.cli import build_parser


def _explains_every_flag(sub, flags):
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    text = sub.format_help()
    for flag in flags:
        assert flag in text


def test_generate_help_explains_every_flag():
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    _explains_every_flag(sub, ["--model", "--dtype", "--temperature", "--top-k", "--top-p", "--max-tokens", "--chat", "--ignore-eos"])


def test_serve_help_explains_every_flag():
    sub = build_parser()._subparsers._group_actions[0].choices["serve"]
    _explains_every_flag(sub, [
        "--model", "--dtype", "--host", "--port", "--max-model-len", "--kv-cache-memory", "--max-num-batched-tokens",
        "--max-num-seqs", "--served-model-name", "--api-key", "--max-waiting-requests", "--max-request-bytes",
        "--shutdown-grace", "--log-level",
    ])
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)  # the default model on 127.0.0.1:8000


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "xllm.entrypoints.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_streams_greedy_text():
    proc = run_cli("generate", "The capital of France is", "--max-tokens", "4", "--dtype", "float32", "--kv-cache-memory", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" Paris")
    assert "loaded" in proc.stderr  # one log line about loading


@pytest.mark.slow
def test_generate_chat():
    proc = run_cli("generate", "--chat", "Say hello.", "--max-tokens", "8", "--kv-cache-memory", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert "Hello" in proc.stdout


def test_bad_model_is_a_clear_error_without_traceback():
    proc = run_cli("generate", "hi", "--model", "/no/such/model.gguf")
    assert proc.returncode == 2
    assert "error: unknown model" in proc.stderr and "Traceback" not in proc.stderr
