"""Decode step time and attention time: the xtensor KV layout against the paged one.

For each batch size and context length, both layouts hold the same synthetic KV (random values;
each sequence's blocks drawn from a shuffled pool, as after a long run) and run the same decode
step: one new token per sequence at position `context - 1`. Measured, medians of `--repeats`
interleaved runs:

- `step`: the model runner's whole decode step (input layout, xtensor page mapping, forward,
  greedy sampling);
- `attention`: the attention op alone over every layer's cache (the new K/V written, then attend),
  with the step's own metadata.

Each configuration runs on the compiled C++ kernels (the default path) and on the torch path
(`--no-compiled-kernels`; paged = gather + batched SDPA, xtensor = one SDPA per range). The page
size is one block: `block_size` tokens of every layer.

    python benchmarks/xtensor.py [--batches 1,16,32] [--contexts 512,2048] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time

import torch

from xllm.bench.machine import machine_info
from xllm.bench.report import table
from xllm.bench.results import command_line, write_summary
from xllm.config import CacheConfig, ModelConfig
from xllm.kv.xtensor import pool_mappings
from xllm.models.loader import load_model
from xllm.ops import cpu_kernels
from xllm.ops.attention import paged_attention
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import SamplingContext
from xllm.worker.model_runner import ModelRunner
from xllm.worker.state import RunBatch, RunItem

LAYOUTS = ("paged", "xtensor")


def decode_step(batch: int, context: int, block_size: int, num_blocks: int, seed: int = 0) -> RunBatch:
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    per_seq = -(-context // block_size)
    sampling = SamplingContext(SamplingParams(temperature=0.0), None, [1], [], frozenset())
    items = [
        RunItem(f"seq-{i}", [rng.randrange(1000)], context - 1, [free.pop() for _ in range(per_seq)], True, sampling)
        for i in range(batch)
    ]
    return RunBatch(items)


def time_ms(fn, repeats: int) -> float:
    fn()  # warm-up (maps the xtensor pages on the first call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def attention_all_layers(runner: ModelRunner, step: RunBatch):
    arch = runner.arch
    inputs = runner._bind(step, runner.layout(step), None, {})
    md = inputs.md
    b = len(step.scheduled)
    q = torch.randn(b, arch.num_attention_heads, arch.head_dim, dtype=runner.dtype)
    k = torch.randn(b, arch.num_key_value_heads, arch.head_dim, dtype=runner.dtype)
    scale = arch.head_dim**-0.5

    def run():
        for cache, ranges in zip(runner.kv_caches, runner.kv_ranges):
            paged_attention(q, k, k, cache, md, scale, ranges)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-torch-path", action="store_true", help="skip the torch-path (no compiled kernels) rows")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/xtensor-<date>.json)")
    args = parser.parse_args(argv)
    command = command_line(None if argv is None else [sys.argv[0], *argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    max_len = max(contexts)
    loaded = load_model(ModelConfig(model=args.model, dtype=args.dtype, max_model_len=max_len))
    if cpu_kernels.load() is None:
        print("the C++ kernels are not built (xllm build-kernels): only the torch path runs", file=sys.stderr)
    num_blocks = max(batches) * -(-max_len // args.block_size)
    runners = {}
    for layout in LAYOUTS:
        cache = CacheConfig(block_size=args.block_size, num_blocks=num_blocks, kv_layout=layout, enable_prefix_caching=False)
        runner = ModelRunner(loaded.model, loaded.arch, cache, loaded.dtype, max_model_len=max_len, max_num_seqs=max(batches))
        gen = torch.Generator().manual_seed(0)
        for c in runner.kv_caches:  # the same synthetic KV in both layouts
            c.copy_(torch.randn(c.shape, generator=gen, dtype=torch.float32).to(c.dtype))
        runners[layout] = runner
    pool = runners["xtensor"].xtensor
    built = cpu_kernels.load() is not None
    paths = ([True] if built else []) + ([] if args.no_torch_path and built else [False])
    rows, results = [], []
    for kernels in paths:
        cpu_kernels.set_enabled(kernels)
        for context in contexts:
            for batch in batches:
                step_out = decode_step(batch, context, args.block_size, num_blocks)
                fns = {}
                for layout, runner in runners.items():
                    def step(runner=runner):
                        runner.bind_cache()
                        runner.execute(step_out)
                    fns[(layout, "step")] = step
                    runner.bind_cache()
                    fns[(layout, "attention")] = attention_all_layers(runner, step_out)
                times: dict = {key: [] for key in fns}
                for _ in range(args.repeats):  # interleaved: each repeat times every variant once
                    for key, fn in fns.items():
                        times[key].append(time_ms(fn, 1))
                med = {key: statistics.median(v) for key, v in times.items()}
                mappings = pool_mappings() - 1
                pool.check_invariants()
                for layout in runners:
                    runners[layout].release([item.request_id for item in step_out.scheduled])
                entry = {
                    "path": "kernels" if kernels else "torch", "batch": batch, "context": context,
                    **{f"{layout}_{what}_ms": round(med[(layout, what)], 3) for layout in LAYOUTS for what in ("step", "attention")},
                    "xtensor_mappings": mappings,
                }
                results.append(entry)
                rows.append([
                    entry["path"], batch, context,
                    f"{entry['paged_step_ms']:.2f}", f"{entry['xtensor_step_ms']:.2f}",
                    f"{entry['paged_step_ms'] / entry['xtensor_step_ms']:.2f}x",
                    f"{entry['paged_attention_ms']:.2f}", f"{entry['xtensor_attention_ms']:.2f}",
                    f"{entry['paged_attention_ms'] / entry['xtensor_attention_ms']:.2f}x", mappings,
                ])
    cpu_kernels.set_enabled(True)
    info = machine_info(torch.get_num_threads())
    header = ["path", "batch", "context", "paged step ms", "xtensor step ms", "speed-up", "paged attn ms",
              "xtensor attn ms", "speed-up", "maps"]
    print(f"xtensor vs paged KV, {loaded.source}, {args.dtype}, page = {args.block_size} tokens = {pool.page_bytes >> 10} KiB, huge pages "
          f"{'on' if pool.huge_pages else 'off'}; {info['cpu']}, {torch.get_num_threads()} threads; medians of {args.repeats}")
    print(table([header, *[[str(c) for c in r] for r in rows]]))
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"xtensor-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.json"
    )
    write_summary(out, {"command": command, "machine": info, "dtype": args.dtype, "block_size": args.block_size,
                        "page_bytes": pool.page_bytes, "huge_pages": pool.huge_pages, "repeats": args.repeats,
                        "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
