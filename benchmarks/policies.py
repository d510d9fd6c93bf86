"""The batch policies side by side: TTFT, inter-token latency and throughput on a mixed workload.

One `xllm serve` per policy (chunked, prefill-first, decode-first) and overlap setting (on, the
default, and `--no-overlap`), all up at once; the ShareGPT-like mix (long prompts arriving among
ongoing decodes) at Poisson rates through `xllm bench serve`, the servers interleaved, repeated;
medians of the per-run figures, as a table and a plot (TTFT p50 against ITL p99: the trade-off).

    python benchmarks/policies.py [--rates 0.5] [--num-prompts 24] [--repeats 2] [--overlap both]

Results: in benchmarks/results/policies-<date>-<time>/, summary.json (every run's figures and the
command line), run-<repeat>.json (each repeat's `xllm bench serve` summary) and tradeoff.png; every
request, gzipped, in benchmarks/results/raw/policies-<date>-<time>/ (ignored by git).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile

from xllm.bench.launch import launch_xllm
from xllm.bench.report import table
from xllm.bench.results import command_line, raw_dir, write_summary
from xllm.bench.serve import ServeBenchConfig, run_benchmark

POLICIES = ("chunked", "prefill-first", "decode-first")
METRICS = (("TTFT p50", "ttft_ms", "median"), ("TTFT p99", "ttft_ms", "p99"), ("ITL p50", "itl_ms", "median"),
           ("ITL p99", "itl_ms", "p99"), ("TPOT p50", "tpot_ms", "median"))


def plot_tradeoff(runs: dict[tuple[str, float], list[dict]], path: str) -> None:
    """TTFT p50 (x) against ITL p99 (y), a point per policy and overlap setting at each rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (label, rate), summaries in runs.items():
        ttft = statistics.median(s["ttft_ms"]["median"] for s in summaries)
        itl = statistics.median(s["itl_ms"]["p99"] for s in summaries)
        marker = "o" if "no-overlap" not in label else "x"
        ax.scatter([ttft], [itl], marker=marker, s=60)
        ax.annotate(f"{label} @ {rate:g}", (ttft, itl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("TTFT p50 (ms)")
    ax.set_ylabel("ITL p99 (ms)")
    ax.set_title("Batch policies: first-token latency against inter-token tail")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra `xllm serve` flags for every server")
    ap.add_argument("--overlap", default="both", choices=["both", "on", "off"])
    ap.add_argument("--kv-cache-memory", default="0.5", help="GiB of KV cache per server (several run at once)")
    args = ap.parse_args()
    overlaps = {"both": (True, False), "on": (True,), "off": (False,)}[args.overlap]
    rates = tuple(float(r) for r in args.rates.split(","))
    stamp = f"{datetime.datetime.now():%Y-%m-%d-%H%M%S}"
    out_dir = os.path.join(os.path.dirname(__file__), "results", f"policies-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    runs: dict[tuple[str, float], list[dict]] = {}
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as stack:
        urls = {}
        for policy in POLICIES:
            for overlap in overlaps:
                flags = ["--scheduling-policy", policy, "--served-model-name", "model", "--kv-cache-memory", args.kv_cache_memory]
                server = stack.enter_context(launch_xllm(logs, *flags, *([] if overlap else ["--no-overlap"]),
                                                         *args.extra.split(), threads=args.threads))
                urls[policy if overlap else f"{policy} no-overlap"] = server.url
        for repeat in range(args.repeats):
            cfg = ServeBenchConfig.create(
                base_urls=tuple(urls.values()), labels=tuple(urls), models=("model",), dataset="sharegpt",
                num_prompts=args.num_prompts, request_rates=rates, seed=repeat,
                output=os.path.join(out_dir, f"run-{repeat}.json"),
                raw_output=os.path.join(raw_dir(out_dir), f"run-{repeat}.json.gz"), draw_plot=False,
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
    write_summary(os.path.join(out_dir, "summary.json"), {
        "command": command_line(), "args": vars(args), "runs": {f"{p}@{r}": v for (p, r), v in runs.items()}})
    plot_tradeoff(runs, os.path.join(out_dir, "tradeoff.png"))
    print(f"wrote {out_dir} (every request: {raw_dir(out_dir)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
