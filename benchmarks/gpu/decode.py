"""Decode on one device: xLLM against transformers' `generate`, the same weights, interleaved.

Random weights on a real model's shape (SmolLM2-135M's config by default, `--config qwen2.5-0.5b`
for a wider one), written once by transformers as a safetensors folder and read by both engines:
no hub, nothing downloaded. Workloads, greedy with EOS ignored:
- batch 1: one 128-token prompt; time with 129 new tokens minus time with 1, over 128, is the
  time per output token (prefill excluded);
- batch 32: 32 prompts of 128 tokens (one length: no padding for transformers), 128 new tokens
  each: output tokens per second, and the time per decode step the same way as batch 1.
`--repeats` interleaved rounds (ours, theirs, ...), medians. A table is printed and a JSON summary
written (with the command). `--dry-run`: a tiny shape on the CPU, to check the script itself.

    python benchmarks/gpu/decode.py --device cuda --output gpu-decode.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from xllm.bench.offline import interleaved, make_prompts, timed_generate  # noqa: E402
from xllm.bench.results import command_line, write_summary  # noqa: E402

CONFIGS = {  # (transformers class name, config) of real models; random weights
    "smollm2-135m": ("LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True)),
    "tiny": ("LlamaForCausalLM", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True)),
}


def write_checkpoint(name: str, dtype: torch.dtype, folder: str) -> str:
    import transformers

    cls_name, cfg = CONFIGS[name]
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config_cls(**cfg, initializer_range=0.02)).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Xllm:
    name = "xLLM"

    def __init__(self, folder: str, device: str, dtype: str, max_seqs: int):
        from xllm.entrypoints.llm import LLM

        self.llm = LLM(folder, device=device, dtype=dtype, kv_cache_memory_gib=2.0, max_num_seqs=max_seqs)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from xllm.sampling_params import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [o.outputs[0].token_ids for o in self.llm.generate(prompts, params)]


class Transformers:
    name = "transformers"

    def __init__(self, folder: str, device: str, dtype: str):
        import transformers

        transformers.logging.set_verbosity_error()
        self.device = device
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        synchronize(self.device)
        return out[:, ids.shape[1] :].tolist()


def run(args) -> dict:
    device, dtype = args.device, args.dtype
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(args.config, getattr(torch, dtype), tmp)
        engines = [Xllm(folder, device, dtype, max(args.batch, 1)), Transformers(folder, device, dtype)]
        vocab = CONFIGS[args.config][1]["vocab_size"]
        prompts = make_prompts(vocab, args.batch, args.input_len, seed=0)
        for engine in engines:  # warm-up: first calls, allocator, kernel selection
            timed_generate(engine, prompts, 4)
            timed_generate(engine, prompts[:1], 4)
        n = args.output_len

        def step_time(batch: list[list[int]]):
            def measure(engine):
                short, _ = timed_generate(engine, batch, 1)
                long, _ = timed_generate(engine, batch, n + 1)
                return (long - short) / n, long

            return measure

        one = interleaved(engines, args.repeats, step_time(prompts[:1]))
        many = interleaved(engines, args.repeats, step_time(prompts))
    report = {"command": command_line(), "device": device, "dtype": dtype, "config": args.config,
              "input_len": args.input_len, "output_len": n, "batch": args.batch, "repeats": args.repeats,
              "machine": machine(device), "engines": {}}
    for name in one:
        b1 = statistics.median(t for t, _ in one[name])
        step = statistics.median(t for t, _ in many[name])
        wall = statistics.median(w for _, w in many[name])
        report["engines"][name] = {
            "batch1_ms_per_token": b1 * 1e3, "batch1_runs_ms": [t * 1e3 for t, _ in one[name]],
            f"batch{args.batch}_ms_per_step": step * 1e3, f"batch{args.batch}_runs_ms": [t * 1e3 for t, _ in many[name]],
            f"batch{args.batch}_output_tok_per_s": args.batch * (n + 1) / wall,
        }
    ours, theirs = report["engines"]["xLLM"], report["engines"]["transformers"]
    report["ratios"] = {
        "batch1_speedup": theirs["batch1_ms_per_token"] / ours["batch1_ms_per_token"],
        f"batch{args.batch}_speedup": theirs[f"batch{args.batch}_ms_per_step"] / ours[f"batch{args.batch}_ms_per_step"],
    }
    return report


def machine(device: str) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def table(report: dict) -> str:
    b = report["batch"]
    rows = [f"decode on {report['device']} ({report['machine'].get('gpu', report['machine'].get('cpu'))}), "
            f"{report['config']} random weights, {report['dtype']}, {report['input_len']} in / {report['output_len']} out, "
            f"medians of {report['repeats']}",
            f"{'engine':<14}{'b=1 ms/token':>14}{f'b={b} ms/step':>15}{f'b={b} out tok/s':>17}"]
    for name, e in report["engines"].items():
        rows.append(f"{name:<14}{e['batch1_ms_per_token']:>14.2f}{e[f'batch{b}_ms_per_step']:>15.2f}"
                    f"{e[f'batch{b}_output_tok_per_s']:>17.0f}")
    r = report["ratios"]
    rows.append(f"xLLM / transformers: {r['batch1_speedup']:.2f}x at batch 1, {r[f'batch{b}_speedup']:.2f}x at batch {b} "
                "(time per token or step; > 1 = xLLM faster)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--config", default="smollm2-135m", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="the JSON summary (default: benchmarks/results/gpu-decode-<time>.json)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU, few tokens: checks the script")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.dtype, args.config = "cpu", "float32", "tiny"
        args.batch, args.input_len, args.output_len, args.repeats = 4, 16, 8, 1
    started = time.perf_counter()
    report = run(args)
    report["seconds"] = time.perf_counter() - started
    print(table(report))
    path = args.output or os.path.join("benchmarks", "results", time.strftime("gpu-decode-%Y-%m-%d-%H%M%S.json"))
    write_summary(path, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
