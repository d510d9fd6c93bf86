"""`xllm bench offline`: batched offline throughput of xLLM against Hugging Face transformers.

For each dtype, both engines are loaded once (loading is not timed) and then run, interleaved,
the same workload: N prompts of exactly `input_len` seeded random token ids, `output_len` greedy
tokens each with EOS ignored. Then batch-1 decode: one prompt, timed with 1 and output_len + 1
new tokens; the difference is output_len decode steps. Medians, every run, the machine's matmul
rate and memory bandwidth, and the fraction of the compute and bandwidth rooflines each engine
reaches are printed as a table and written to JSON with the command line (a summary: every run's
figure, no per-request data).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xllm.bench.machine import measure_machine
from xllm.bench.results import RESULTS_DIR, command_line
from xllm.bench.roofline import ModelCost, mean_decode_context
from xllm.config import DTYPE_CHOICES, parse_dtype

# Output-throughput ratio xLLM / transformers that each dtype must reach.
TARGETS = {"bfloat16": 2.0, "float32": 1.5}
QUICK = dict(num_prompts=4, input_len=32, output_len=8, repeats=2)


@dataclass(frozen=True)
class OfflineConfig:
    """One benchmark run; the defaults are the reference workload."""

    model: str | None = None  # None = the default model, SmolLM2-135M-Instruct
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    repeats: int = 3
    threads: int = 2
    seed: int = 0  # of the prompts' token ids
    peer: bool = True  # also run transformers
    quick: bool = False  # small workload and machine measurements, for development
    output: str | None = None  # JSON path; None = benchmarks/results/offline-<date>-<time>.json
    kv_cache_memory_gib: float | None = None  # xLLM's KV cache; None = the engine's default

    @classmethod
    def create(cls, quick: bool = False, **overrides) -> "OfflineConfig":
        """The defaults, the quick preset over them when `quick`, then every override that is not None."""
        values = dict(QUICK) if quick else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(quick=quick, **values)


class XllmEngine:
    """Our engine behind the common `generate(prompts, max_tokens) -> output token ids` call."""

    name = "xLLM"

    def __init__(self, cfg: OfflineConfig, dtype: str):
        """Load `cfg.model` in `dtype` with `cfg.threads` threads (and `cfg.kv_cache_memory_gib` if set)."""
        from xllm.entrypoints.llm import LLM

        kv = {} if cfg.kv_cache_memory_gib is None else {"kv_cache_memory_gib": cfg.kv_cache_memory_gib}
        self.llm = LLM(cfg.model, dtype=dtype, num_threads=cfg.threads, **kv)
        self.arch = self.llm.engine.arch

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy, EOS ignored; one list of new token ids per prompt."""
        from xllm.sampling_params import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [out.outputs[0].token_ids for out in self.llm.generate(prompts, params)]


class TransformersEngine:
    """Hugging Face transformers' `generate`, reading the same file as our engine."""

    name = "transformers"

    def __init__(self, cfg: OfflineConfig, dtype: str):
        """Load `cfg.model` (a GGUF through transformers' GGUF reader, or a folder) in `dtype`."""
        try:
            import transformers
        except ImportError:
            raise ValueError("the transformers peer needs transformers and accelerate (or pass --no-peer)") from None
        from xllm.models.loader.resolve import resolve_model_source  # the same file our engine reads

        transformers.logging.set_verbosity_error()
        kind, path = resolve_model_source(cfg.model)
        folder, extra = (os.path.dirname(path), {"gguf_file": os.path.basename(path)}) if kind == "gguf" else (path, {})
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=parse_dtype(dtype), **extra).eval()
        config = self.model.generation_config
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos or 0)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Batched greedy `generate`, exactly `max_tokens` new tokens (prompts share one length: no padding)."""
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.pad_token_id,
            )
        return out[:, ids.shape[1] :].tolist()


def make_prompts(vocab_size: int, num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    """`num_prompts` lists of exactly `input_len` token ids, uniform over the vocabulary, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, input_len), generator=gen).tolist()


def timed_generate(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Wall seconds of one `generate` call and its outputs, checked to hold `max_tokens` tokens each."""
    start = time.perf_counter()
    outputs = engine.generate(prompts, max_tokens)
    seconds = time.perf_counter() - start
    lengths = {len(o) for o in outputs}
    if len(outputs) != len(prompts) or lengths != {max_tokens}:
        got = f"{len(outputs)} outputs of {sorted(lengths)} tokens"
        raise RuntimeError(f"{engine.name} returned {got}; expected {len(prompts)} of {max_tokens}")
    return seconds, outputs


def decode_rate(engine, prompt: list[int], output_len: int) -> float:
    """Batch-1 decode tok/s: time(output_len + 1 new tokens) - time(1 new token) is output_len decode steps."""
    short, _ = timed_generate(engine, [prompt], 1)
    long, _ = timed_generate(engine, [prompt], output_len + 1)
    return output_len / (long - short)


def interleaved(engines: list, repeats: int, measure: Callable) -> dict[str, list]:
    """`measure(engine)` for each engine in turn (ours, theirs, ours, theirs, ...), `repeats` rounds."""
    runs: dict[str, list] = {e.name: [] for e in engines}
    for _ in range(repeats):
        for engine in engines:
            runs[engine.name].append(measure(engine))
    return runs


def bench_dtype(cfg: OfflineConfig, dtype: str, machine: dict) -> tuple[dict, ModelCost]:
    """Load both engines in `dtype`, run the batched and batch-1 decode workloads, summarize them."""
    engines = [XllmEngine(cfg, dtype)] + ([TransformersEngine(cfg, dtype)] if cfg.peer else [])
    cost = ModelCost.from_arch(engines[0].arch)
    prompts = make_prompts(cost.vocab_size, cfg.num_prompts, cfg.input_len, cfg.seed)
    for engine in engines:  # warm-up: first-call allocations and kernel selection are not timed
        timed_generate(engine, prompts[:2], 2)
    outputs: dict[str, list] = {}

    def batched(engine) -> float:
        """Seconds of the whole batched workload; keeps the outputs to compare the engines'."""
        seconds, outputs[engine.name] = timed_generate(engine, prompts, cfg.output_len)
        return seconds

    seconds = interleaved(engines, cfg.repeats, batched)
    decode = interleaved(engines, cfg.repeats, lambda e: decode_rate(e, prompts[0], cfg.output_len))
    del engines
    gc.collect()
    peak_gflops, bandwidth = machine["matmul_gflops"][dtype]["best"], machine["bandwidth_gbs"]["roofline"]
    result = {
        "batched": summarize_batched(cfg, cost, seconds, peak_gflops, TARGETS.get(dtype)),
        "decode_batch1": summarize_decode(cfg, cost, decode, bandwidth, parse_dtype(dtype).itemsize),
    }
    if cfg.peer:
        same = sum(a == b for a, b in zip(outputs["xLLM"], outputs["transformers"]))
        result["batched"]["same_output_fraction"] = same / cfg.num_prompts
    return result, cost


def ratio_of_medians(medians: dict[str, float]) -> float | None:
    """xLLM's median over transformers' (None without the peer)."""
    return medians["xLLM"] / medians["transformers"] if "transformers" in medians else None


def summarize_batched(
    cfg: OfflineConfig, cost: ModelCost, seconds: dict[str, list[float]], peak_gflops: float, target: float | None
) -> dict:
    """Per engine: runs, median output and total tok/s, effective GFLOP/s, compute-roofline fraction."""
    output_tokens = cfg.num_prompts * cfg.output_len
    total_tokens = cfg.num_prompts * (cfg.input_len + cfg.output_len)
    flops = cfg.num_prompts * cost.sequence_flops(cfg.input_len, cfg.output_len)
    roofline_s = flops / (peak_gflops * 1e9)
    engines = {}
    for name, runs in seconds.items():
        median_s = statistics.median(runs)
        engines[name] = {
            "seconds": runs,
            "output_tok_s": [output_tokens / s for s in runs],
            "median_output_tok_s": output_tokens / median_s,
            "median_total_tok_s": total_tokens / median_s,
            "effective_gflops": flops / median_s / 1e9,
            "compute_roofline_fraction": roofline_s / median_s,
        }
    ratio = ratio_of_medians({n: e["median_output_tok_s"] for n, e in engines.items()})
    return {
        "workload_flops": flops,
        "peak_gflops": peak_gflops,
        "roofline_seconds": roofline_s,
        "engines": engines,
        "ratio": ratio,
        "target": target,
        "pass": None if ratio is None or target is None else ratio >= target,
    }


def summarize_decode(
    cfg: OfflineConfig, cost: ModelCost, rates: dict[str, list[float]], bandwidth_gbs: float, dtype_bytes: int
) -> dict:
    """Per engine: batch-1 decode tok/s runs and median, and the fraction of the bandwidth roofline."""
    context = mean_decode_context(cfg.input_len, cfg.output_len)
    bytes_per_token = cost.decode_bytes(context, dtype_bytes)
    roofline = bandwidth_gbs * 1e9 / bytes_per_token
    engines = {}
    for name, runs in rates.items():
        median = statistics.median(runs)
        engines[name] = {"tok_s": runs, "median_tok_s": median, "bandwidth_roofline_fraction": median / roofline}
    return {
        "mean_context": context,
        "bytes_per_token": bytes_per_token,
        "bandwidth_gbs": bandwidth_gbs,
        "roofline_tok_s": roofline,
        "engines": engines,
        "ratio": ratio_of_medians({n: e["median_tok_s"] for n, e in engines.items()}),
    }


def run_offline(cfg: OfflineConfig) -> dict:
    """Measure the machine, then every dtype; return the whole report (what the JSON holds)."""
    from xllm.models.loader.resolve import DEFAULT_MODEL

    for dtype in cfg.dtypes:
        parse_dtype(dtype)  # fail on a bad name before minutes of measuring
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        machine = measure_machine([parse_dtype(d) for d in cfg.dtypes], cfg.threads, cfg.quick)
        report = {"config": dataclasses.asdict(cfg), "machine": machine, "model": None, "results": {}}
        for dtype in cfg.dtypes:
            report["results"][dtype], cost = bench_dtype(cfg, dtype, machine)
            report["model"] = {
                "name": os.path.basename(os.path.normpath(cfg.model)) if cfg.model else DEFAULT_MODEL,
                **dataclasses.asdict(cost),
                "total_params": cost.total_params,
                "flops_per_token": cost.flops_per_token,
            }
    finally:
        torch.set_num_threads(previous_threads)
    return report


def default_output_path(now: datetime.datetime | None = None) -> str:
    """benchmarks/results/offline-<date>-<time>.json under the current directory."""
    stamp = f"{now or datetime.datetime.now():%Y-%m-%d-%H%M%S}"
    return os.path.join(RESULTS_DIR, f"offline-{stamp}.json")


def write_report(report: dict, path: str) -> str:
    """Write the report as indented JSON, creating the folder; return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return path


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `xllm bench offline` (and of benchmarks/offline.py)."""
    d = OfflineConfig()
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    add = parser.add_argument
    add("--model", help="a GGUF file or Hugging Face folder, read by both engines (default: SmolLM2-135M-Instruct)")
    add("--dtypes", nargs="+", default=list(d.dtypes), choices=[c for c in DTYPE_CHOICES if c != "auto"],
        help="precisions to compare, each with its own pass/fail target (default: float32 bfloat16)")
    add("--num-prompts", type=int, help=f"prompts in the batch (default {d.num_prompts})")
    add("--input-len", type=int, help=f"tokens per prompt, exactly (default {d.input_len})")
    add("--output-len", type=int, help=f"tokens generated per prompt, EOS ignored (default {d.output_len})")
    add("--repeats", type=int, help=f"interleaved runs per engine; medians are reported (default {d.repeats})")
    add("--threads", type=int, default=d.threads, help=f"torch threads for both engines (default {d.threads})")
    add("--seed", type=int, default=d.seed, help=f"seed of the prompts' random token ids (default {d.seed})")
    add("--kv-cache-memory", type=float, metavar="GIB", help="xLLM's KV cache in GiB (default: the engine's, 2)")
    add("--output", metavar="PATH", help="JSON file (default benchmarks/results/offline-<date>-<time>.json)")
    add("--no-peer", action="store_true", help="skip Hugging Face transformers (no ratio, no pass/fail)")
    add("--quick", action="store_true", help=f"small run for development: {quick}, smaller machine measurements")
    add("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default warning)")


def config_from_args(args: argparse.Namespace) -> OfflineConfig:
    """An `OfflineConfig` from parsed `add_offline_args` flags."""
    return OfflineConfig.create(
        quick=args.quick,
        model=args.model,
        dtypes=tuple(args.dtypes),
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
        peer=not args.no_peer,
        output=args.output,
        kv_cache_memory_gib=args.kv_cache_memory,
    )


def cmd_offline(args: argparse.Namespace, command: str | None = None) -> int:
    """Run the benchmark from parsed flags: print the table, write the JSON with `command` (default: sys.argv)."""
    from xllm.bench.report import format_report

    cfg = config_from_args(args)
    report = {"command": command or command_line(), **run_offline(cfg)}
    path = write_report(report, cfg.output or default_output_path())
    print(format_report(report))
    print(f"\nwritten: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (benchmarks/offline.py): same flags as `xllm bench offline`."""
    from xllm.logger import configure_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_offline_args(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    return cmd_offline(args, command_line(None if argv is None else [sys.argv[0], *argv]))


if __name__ == "__main__":
    sys.exit(main())
