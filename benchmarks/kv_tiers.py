"""TTFT when shared prefixes outgrow the device KV cache: prefix-cache tiers on and off.

`--prefixes` distinct system prompts of `--prefix-len` tokens (random token ids, seeded) are first
computed once each, in order, by an engine whose device KV cache holds only a few of them, so the
earliest are evicted. Then each prefix gets a new request (prefix + a fresh `--question-len`-token
question, one output token) and its time to first token is measured. Configurations, each its own
engine on the same model:

- `recompute`: prefix caching on, no lower tiers: evicted prefixes are computed again;
- `host`: a host tier large enough for every prefix;
- `disk (cold)`: no host tier, a disk tier; before the measured requests every entry is dropped
  from the OS page cache (fsync + posix_fadvise DONTNEED), so each promotion reads the disk.

Prints median TTFT and hits per tier; writes a summary JSON (per configuration: the medians, each
run's median, the tier hits; and the command line) to benchmarks/results/ and every request's TTFT
and cached tokens, gzipped, to benchmarks/results/raw/ (ignored by git).

    python benchmarks/kv_tiers.py [--prefixes 6] [--prefix-len 1024] [--device-blocks 160] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import tempfile
import time

from xllm import LLM, SamplingParams
from xllm.bench.report import table
from xllm.bench.results import command_line, raw_path, write_raw, write_summary


def drop_page_cache(folder: str) -> int:
    """Write back and drop every entry under `folder` (its fingerprint folders) from the page cache;
    returns the file count."""
    os.sync()
    count = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if not name.endswith(".kv"):
                continue
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


def measure(config: str, args, prefixes: list[list[int]], questions: list[list[int]]) -> dict:
    kw = dict(dtype=args.dtype, num_blocks=args.device_blocks, num_threads=args.threads)
    with tempfile.TemporaryDirectory() as disk:
        if config == "host":
            kw["kv_host_memory_gib"] = args.host_gib
        elif config == "disk (cold)":
            kw.update(kv_host_memory_gib=0.0, kv_disk_dir=disk, kv_disk_gib=args.disk_gib)
        llm = LLM(**kw)
        one = SamplingParams(temperature=0.0, max_tokens=1)
        llm.generate([[1, 2, 3]], one)  # warm-up
        for p in prefixes:  # fill: each prefix computed once (with a throwaway question)
            llm.generate([p + [7] * 8], one)
        if config == "disk (cold)":
            llm.engine.runner.kv_connector.flush()  # the writer thread has written every entry
        dropped = drop_page_cache(disk) if config == "disk (cold)" else 0
        tiers = llm.engine.kv.connector
        before = dict(tiers.hits) if tiers else {}
        ttft, cached = [], []
        for p, q in zip(prefixes, questions):
            start = time.perf_counter()
            out = llm.generate([p + q], one)[0]
            ttft.append(1000 * (time.perf_counter() - start))
            cached.append(out.num_cached_tokens)
        hits = {t: n - before.get(t, 0) for t, n in (tiers.hits.items() if tiers else [])}
        return {"ttft_ms": ttft, "cached_tokens": cached, "tier_hit_blocks": hits, "dropped_files": dropped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefixes", type=int, default=6)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--device-blocks", type=int, default=160, help="device KV blocks (16 tokens each)")
    ap.add_argument("--host-gib", type=float, default=1.0)
    ap.add_argument("--disk-gib", type=float, default=2.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    rng = random.Random(0)
    configs = ["recompute", "host", "disk (cold)"]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        prefixes = [[rng.randrange(1000, 40000) for _ in range(args.prefix_len)] for _ in range(args.prefixes)]
        questions = [[rng.randrange(1000, 40000) for _ in range(args.question_len)] for _ in range(args.prefixes)]
        for c in configs:  # interleaved
            runs[c].append(measure(c, args, prefixes, questions))
            print(f"repeat {repeat + 1}, {c}: median TTFT {statistics.median(runs[c][-1]['ttft_ms']):.0f} ms", file=sys.stderr)
    rows = [["config", "median TTFT ms", "TTFT per run (median of its requests)", "cached tokens / request", "tier hits (blocks)"]]
    base = statistics.median(t for r in runs["recompute"] for t in r["ttft_ms"])
    summary = {}
    for c in configs:
        all_ttft = [t for r in runs[c] for t in r["ttft_ms"]]
        hits = {}
        for r in runs[c]:
            for t, n in r["tier_hit_blocks"].items():
                hits[t] = hits.get(t, 0) + n
        summary[c] = {
            "median_ttft_ms": statistics.median(all_ttft),
            "speedup_vs_recompute": base / statistics.median(all_ttft),
            "run_median_ttft_ms": [statistics.median(r["ttft_ms"]) for r in runs[c]],
            "median_cached_tokens": statistics.median(n for r in runs[c] for n in r["cached_tokens"]),
            "tier_hit_blocks": hits,
            "dropped_files": [r["dropped_files"] for r in runs[c]],
        }
        rows.append([
            c, f"{statistics.median(all_ttft):.0f} ({base / statistics.median(all_ttft):.1f}x)",
            " ".join(f"{statistics.median(r['ttft_ms']):.0f}" for r in runs[c]),
            f"{statistics.median(n for r in runs[c] for n in r['cached_tokens']):.0f}",
            ", ".join(f"{t} {n}" for t, n in hits.items()) or "-",
        ])
    print(f"prefix-cache tiers  {datetime.date.today()}  {args.prefixes} prefixes x {args.prefix_len} tokens, "
          f"device cache {args.device_blocks} blocks x 16 tokens, {args.dtype}, {args.threads} threads, {args.repeats} repeats")
    print(table(rows))
    out = args.output or os.path.join(os.path.dirname(__file__), "results", f"kv-tiers-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.json")
    raw = write_raw(raw_path(out), {"args": vars(args), "runs": runs})
    write_summary(out, {"command": command_line(), "args": vars(args), "configs": summary, "raw": raw})
    print(f"wrote {out} (every request: {raw})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
