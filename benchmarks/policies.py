"""The batch policies side by side: TTFT, inter-token latency and throughput on a mixed workload.

One `xllm serve` per policy (chunked, prefill-first, decode-first), all up at once; the
ShareGPT-like mix (long prompts arriving among ongoing decodes) at Poisson rates through
`xllm bench serve`, the servers interleaved, repeated; medians of the per-run figures.

    python benchmarks/policies.py [--rates 0.5] [--num-prompts 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile

from xllm.bench.launch import launch_xllm
from xllm.bench.report import table
from xllm.bench.serve import ServeBenchConfig, run_benchmark

POLICIES = ("chunked", "prefill-first", "decode-first")
METRICS = (("TTFT p50", "ttft_ms", "median"), ("TTFT p99", "ttft_ms", "p99"), ("ITL p50", "itl_ms", "median"),
           ("ITL p99", "itl_ms", "p99"), ("TPOT p50", "tpot_ms", "median"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra `xllm serve` flags for every server")
    args = ap.parse_args()
    rates = tuple(float(r) for r in args.rates.split(","))
    stamp = f"{datetime.datetime.now():%Y-%m-%d-%H%M%S}"
    out_dir = os.path.join(os.path.dirname(__file__), "results", f"policies-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    runs: dict[tuple[str, float], list[dict]] = {}
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as stack:
        urls = {}
        for policy in POLICIES:
            server = stack.enter_context(launch_xllm(logs, "--scheduling-policy", policy, "--served-model-name", "model",
                                                     *args.extra.split(), threads=args.threads))
            urls[policy] = server.url
        for repeat in range(args.repeats):
            cfg = ServeBenchConfig.create(
                base_urls=tuple(urls.values()), labels=tuple(urls), models=("model",), dataset="sharegpt",
                num_prompts=args.num_prompts, request_rates=rates, seed=repeat,
                output=os.path.join(out_dir, f"run-{repeat}.json"), draw_plot=False,
            )
            for run in run_benchmark(cfg)["runs"]:
                runs.setdefault((run["label"], run["request_rate"]), []).append(run["summary"])
    rows = [["policy", "rate", "out tok/s", *(name + " ms" for name, _, _ in METRICS)]]
    for (policy, rate), summaries in runs.items():
        def med(key, q=None):
            values = [s[key] if q is None else s[key][q] for s in summaries]
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else float("nan")
        rows.append([policy, f"{rate:g}", f"{med('output_throughput'):.1f}", *(f"{med(k, q):.0f}" for _, k, q in METRICS)])
    print(f"batch policies  {datetime.date.today()}  ShareGPT-like mix, {args.num_prompts} requests per run, "
          f"{args.threads} threads, medians of {args.repeats} interleaved repeats")
    print(table(rows))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "runs": {f"{p}@{r}": v for (p, r), v in runs.items()}}, f, indent=1)
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
