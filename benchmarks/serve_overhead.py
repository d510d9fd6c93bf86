"""What serving over HTTP costs: `xllm serve` + `xllm bench serve` against the offline engine.

Same model, precision, prompts and lengths on both sides, interleaved repeats, medians:

- throughput: N prompts (~128 tokens in, 128 out, EOS ignored) with 16 in flight: 16 streaming
  clients in a closed loop against the server; the offline engine with max_num_seqs=16 over the
  same prompts;
- low-load TTFT: one request at a time; the offline engine's time from add_request to the step
  that returns the first token.

Targets (issue 4): HTTP output throughput >= 90% of offline; median TTFT within 20 ms of offline.
The server runs in a subprocess; the load generator and the offline engine share this process
(on a 2-core machine the client's CPU time competes with the server's, as it would for a user).

    python benchmarks/serve_overhead.py [--repeats 3] [--num-prompts 64] [--output results.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

from xllm import LLM, SamplingParams
from xllm.bench.launch import launch_xllm
from xllm.bench.report import table
from xllm.bench.results import command_line, write_summary
from xllm.bench.serve import ServeBenchConfig, run_benchmark
from xllm.bench.serve_workload import Workload


def offline_throughput(llm: LLM, prompts: list[str], output_len: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def offline_ttft_ms(llm: LLM, prompts: list[str], output_len: int) -> float:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        rid = engine.add_request(prompt, params)
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter() - start
        assert first is not None, rid
        times.append(first * 1000)
    return statistics.median(times)


def serve_run(url: str, tmp: str, **kw) -> dict:
    cfg = ServeBenchConfig.create(base_urls=(url,), labels=("xllm",), output=os.path.join(tmp, "run.json"), draw_plot=False, **kw)
    return run_benchmark(cfg)["runs"][0]["summary"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--ttft-prompts", type=int, default=8)
    ap.add_argument("--output", default=None, help="JSON path (default benchmarks/results/serve-overhead-<date>.json)")
    args = ap.parse_args()

    common = dict(input_len=args.input_len, output_len=args.output_len, seed=0)
    load = ServeBenchConfig.create(num_prompts=args.num_prompts, max_concurrency=args.concurrency, **common)
    prompts = [r.text for r in Workload(load).requests(0)]
    low = ServeBenchConfig.create(num_prompts=args.ttft_prompts, max_concurrency=1, **{**common, "output_len": 8})
    ttft_prompts = [r.text for r in Workload(low).requests(0)]

    llm = LLM(dtype="float32", max_num_seqs=args.concurrency, kv_cache_memory_gib=1.0, num_threads=2)
    offline_throughput(llm, prompts[:2], 4)  # warm-up
    rows: dict[str, list[float]] = {k: [] for k in ("offline_tps", "http_tps", "offline_ttft_ms", "http_ttft_ms")}
    with tempfile.TemporaryDirectory() as tmp, launch_xllm(tmp, "--kv-cache-memory", "1.0") as server:
        for _ in range(args.repeats):
            rows["offline_tps"].append(offline_throughput(llm, prompts, args.output_len))
            s = serve_run(server.url, tmp, num_prompts=args.num_prompts, max_concurrency=args.concurrency, **common)
            assert s["failed"] == 0, s
            rows["http_tps"].append(s["output_throughput"])
            rows["offline_ttft_ms"].append(offline_ttft_ms(llm, ttft_prompts, 8))
            s = serve_run(server.url, tmp, num_prompts=args.ttft_prompts, max_concurrency=1, **{**common, "output_len": 8})
            rows["http_ttft_ms"].append(s["ttft_ms"]["median"])
            print({k: round(v[-1], 1) for k, v in rows.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["http_tps"] / med["offline_tps"]
    gap = med["http_ttft_ms"] - med["offline_ttft_ms"]
    print(table([
        ["measure", "offline", "HTTP", "HTTP vs offline", "target", "runs (offline | HTTP)"],
        [f"output tok/s, {args.concurrency} in flight", f"{med['offline_tps']:.1f}", f"{med['http_tps']:.1f}",
         f"{100 * ratio:.1f}%", ">= 90%",
         " ".join(f"{v:.1f}" for v in rows["offline_tps"]) + " | " + " ".join(f"{v:.1f}" for v in rows["http_tps"])],
        ["median TTFT ms, 1 in flight", f"{med['offline_ttft_ms']:.1f}", f"{med['http_ttft_ms']:.1f}", f"{gap:+.1f} ms",
         "<= +20 ms",
         " ".join(f"{v:.1f}" for v in rows["offline_ttft_ms"]) + " | " + " ".join(f"{v:.1f}" for v in rows["http_ttft_ms"])],
    ]))
    path = args.output or os.path.join(
        os.path.dirname(__file__), "results", f"serve-overhead-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.json"
    )
    write_summary(path, {"command": command_line(), "args": vars(args), "runs": rows, "medians": med,
                         "throughput_ratio": ratio, "ttft_gap_ms": gap})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
