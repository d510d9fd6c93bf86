"""Smoke test of `xllm bench offline` on a tiny random-weight Llama: the report's shape, not its speed."""

import argparse
import json

import pytest
import torch

from xllm.bench.offline import OfflineConfig, add_offline_args, config_from_args, main
from xllm.bench.roofline import ModelCost

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# One thread: tiny matmuls on two threads crawl when other processes share the cores. A small KV
# cache: the engine's default 2 GiB would only cost time to zero.
QUICK_ARGS = ["--quick", "--threads", "1", "--kv-cache-memory", "0.01"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-weight tiny Llama saved as a Hugging Face folder; returns (folder, transformers model)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder), model


def run_quick(folder: str, out, *flags: str) -> dict:
    """Run the benchmark's main in quick mode on `folder`; return the JSON it wrote to `out`."""
    assert main(["--model", folder, *QUICK_ARGS, *flags, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def positive(value) -> bool:
    """A real number above zero."""
    return isinstance(value, (int, float)) and value > 0


def test_parameter_count_matches_transformers(tiny_llama):
    import xllm.models.loader  # noqa: F401  (importing arch_config first is circular)
    from xllm.models.arch_config import ArchConfig

    folder, model = tiny_llama
    with open(f"{folder}/config.json") as f:
        cost = ModelCost.from_arch(ArchConfig.from_hf(json.load(f)))
    assert cost.total_params == sum(p.numel() for p in model.parameters())
    assert cost.body_params == cost.total_params - model.model.embed_tokens.weight.numel()


def test_quick_preset_yields_to_explicit_flags():
    parser = argparse.ArgumentParser()
    add_offline_args(parser)
    cfg = config_from_args(parser.parse_args(["--quick", "--output-len", "5", "--no-peer"]))
    assert (cfg.num_prompts, cfg.output_len, cfg.peer, cfg.quick) == (4, 5, False, True)
    reference = config_from_args(parser.parse_args([]))
    assert reference == OfflineConfig()
    assert (reference.num_prompts, reference.input_len, reference.output_len, reference.repeats) == (64, 128, 128, 3)


def test_quick_run_writes_a_complete_report(tiny_llama, tmp_path, capsys):
    out = tmp_path / "report.json"
    report = run_quick(tiny_llama[0], out, "--dtypes", "float32", "bfloat16")
    assert set(report) == {"command", "config", "machine", "model", "results"}
    assert report["command"].endswith(f"--output {out}")  # the command line that made the report
    machine = report["machine"]
    assert machine["threads"] == 1 and machine["torch"] == torch.__version__
    assert positive(machine["bandwidth_gbs"]["roofline"])
    assert report["model"]["total_params"] > 0
    for dtype in ("float32", "bfloat16"):
        assert positive(machine["matmul_gflops"][dtype]["best"])
        batched = report["results"][dtype]["batched"]
        decode = report["results"][dtype]["decode_batch1"]
        assert set(batched["engines"]) == set(decode["engines"]) == {"xLLM", "transformers"}
        for engine in batched["engines"].values():
            assert len(engine["seconds"]) == 2
            for key in ("median_output_tok_s", "median_total_tok_s", "effective_gflops", "compute_roofline_fraction"):
                assert positive(engine[key]), key
        for engine in decode["engines"].values():
            assert positive(engine["median_tok_s"]) and positive(engine["bandwidth_roofline_fraction"])
        assert positive(batched["ratio"]) and positive(decode["ratio"]) and positive(decode["roofline_tok_s"])
        assert isinstance(batched["pass"], bool)
    printed = capsys.readouterr().out
    assert "xLLM / transformers" in printed and "bandwidth roofline" in printed and str(out) in printed
    assert printed.count("PASS") + printed.count("FAIL") == 2  # one verdict per dtype


def test_no_peer_run_has_only_our_engine(tiny_llama, tmp_path):
    report = run_quick(tiny_llama[0], tmp_path / "report.json", "--dtypes", "float32", "--repeats", "1", "--no-peer")
    batched = report["results"]["float32"]["batched"]
    assert set(batched["engines"]) == {"xLLM"} and batched["ratio"] is None and batched["pass"] is None
