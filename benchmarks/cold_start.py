"""Cold start of `xllm serve`: from starting the process to the first answered request.

- `first start`: a new cache folder holding only the built kernels (as `scripts/setup.sh` leaves
  it), so the model's GGUF is converted to the cached float32 folder during this start;
- `cached start` (`--repeats` times): the same folder again, the conversion already there.

Each time is measured from `Popen` to the end of one completion request (8 greedy tokens), with
the server's own log lines for loading and warm-up. Writes JSON.

    python benchmarks/cold_start.py [--repeats 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

from xllm.bench.launch import launch_xllm
from xllm.bench.results import command_line, write_summary
from xllm.config import default_cache_dir
from xllm.ops import cpu_kernels


def one_start(log_dir: str, model: str | None, threads: int) -> float:
    started = time.perf_counter()
    with launch_xllm(log_dir, *(["--model", model] if model else []), threads=threads, timeout=900) as server:
        body = json.dumps({"prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(server.v1 + "/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            json.load(response)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    command = command_line(None if argv is None else [sys.argv[0], *argv])
    kernels = cpu_kernels.build_dir()
    if not os.path.isdir(kernels):
        print("build the kernels first: xllm build-kernels", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as logs:
        shutil.copytree(kernels, cpu_kernels.build_dir(cache))  # what setup.sh leaves: kernels, no converted model
        os.environ["XLLM_CACHE_DIR"] = cache
        first = one_start(logs, args.model, args.threads)
        cached = [one_start(logs, args.model, args.threads) for _ in range(args.repeats)]
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "first_start_s": round(first, 2),
        "cached_start_s": [round(t, 2) for t in cached],
        "cached_start_median_s": round(statistics.median(cached), 2),
        "default_cache_dir": default_cache_dir(),
    }
    print(f"first start (model converted): {first:.1f} s; cached start: median {statistics.median(cached):.1f} s "
          f"of {', '.join(f'{t:.1f}' for t in cached)} s (target < 15 s)")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"cold-start-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.json")
    write_summary(out, {"command": command, **result})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
