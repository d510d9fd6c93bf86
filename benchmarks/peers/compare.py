"""xLLM side by side with llama.cpp (`llama-server`) and vLLM (CPU build), same weights, one run.

Every engine serves the same weights at the same precision: xLLM reads the GGUF; llama.cpp reads
an F32 (or BF16) GGUF that `llama-quantize --allow-requantize` writes from it; vLLM reads the
Hugging Face folder that `xllm convert --to-hf` writes from it. All servers are started first and
stay up; each workload then runs through `xllm bench serve` with the servers interleaved (xLLM,
llama.cpp, vLLM, xLLM, ...), repeated, and the table gives medians and ratios xLLM / peer:

- offline: N prompts of exactly `--input-len` tokens, `--output-len` tokens out (EOS ignored),
  all sent at once (output tok/s, and the fraction of the measured matmul peak it reaches);
- decode-1: one request at a time (time per output token, i.e. batch-1 decode);
- serving: the ShareGPT-like mix at a sweep of Poisson rates; the highest rate whose p99 TTFT and
  p99 TPOT meet the SLO (default 1 s and 100 ms);
- prefix: `--prefix-prompts` requests (32) sharing a `--prefix-len`-token (1,024) system prompt, each
  with its own 64-token question, 64 tokens out, all sent at once (output tok/s and median TTFT),
  also on a second xLLM server with prefix caching off (`xllm-nocache`); llama.cpp runs with its
  prompt cache, vLLM with its prefix caching, as they come.

    bash benchmarks/peers/build_llama_cpp.sh      # ~15-30 min once, cached in ~/.cache/xllm-peers
    bash benchmarks/peers/install_vllm.sh         # its own venv in ~/.cache/xllm-peers
    .venv/bin/python benchmarks/peers/compare.py [--peers llama.cpp,vllm] [--dtype float32] [--quick]

Peers that are not installed are skipped with a note. Results: in benchmarks/results/peers-<date>-<time>/,
summary.txt (the table), summary.json (the medians and the command line), one summary JSON per
workload and repeat (every run's figures) and PNGs; every request of every run, gzipped, in
benchmarks/results/raw/peers-<date>-<time>/ (ignored by git).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch

from xllm.bench.launch import free_port, launch, launch_xllm
from xllm.bench.machine import measure_machine
from xllm.bench.report import table
from xllm.bench.results import command_line, raw_dir, write_summary
from xllm.bench.roofline import ModelCost
from xllm.bench.serve import ServeBenchConfig, run_benchmark

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEERS_DIR = os.environ.get("XLLM_PEERS_DIR", os.path.expanduser("~/.cache/xllm-peers"))
GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16"}
# llama-server splits -c evenly over its -np slots: each slot must hold the longest request of
# every workload (the ShareGPT-like mix goes to 1,024 prompt + 512 output tokens).
SLOT_CONTEXT = 2048


def run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def llama_cpp_bin() -> str | None:
    """The cached llama.cpp build's bin folder, or None (build it with build_llama_cpp.sh)."""
    if not os.path.isdir(PEERS_DIR):
        return None
    for name in sorted(os.listdir(PEERS_DIR), reverse=True):
        path = os.path.join(PEERS_DIR, name, "build", "bin")
        if name.startswith("llama.cpp-") and os.path.isfile(os.path.join(path, "llama-server")):
            return path
    return None


def vllm_python() -> str | None:
    python = os.path.join(PEERS_DIR, "vllm-venv", "bin", "python")
    if os.path.isfile(python) and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    return None


def prepare_weights(gguf: str, dtype: str, work: str, bin_dir: str | None, want_hf: bool) -> dict:
    """The same weights for each engine: the GGUF (xLLM), an F32/BF16 GGUF (llama.cpp), an HF folder (vLLM)."""
    out = {"gguf": gguf}
    cache = os.path.join(PEERS_DIR, "weights")
    os.makedirs(cache, exist_ok=True)
    stem = os.path.splitext(os.path.basename(gguf))[0]
    if bin_dir:
        path = os.path.join(cache, f"{stem}-{GGUF_TYPES[dtype]}.gguf")
        if not os.path.isfile(path):
            run([os.path.join(bin_dir, "llama-quantize"), "--allow-requantize", gguf, path, GGUF_TYPES[dtype]])
        out["llama.cpp"] = path
    if want_hf:
        path = os.path.join(cache, f"{stem}-hf-{dtype}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            run([sys.executable, "-m", "xllm.entrypoints.cli", "convert", gguf, "--to-hf", path, "--dtype", dtype])
        out["vllm"] = path
    return out


def versions(bin_dir: str | None, vllm_py: str | None) -> dict:
    import xllm

    v = {"xllm": xllm.__version__, "torch": torch.__version__, "python": platform.python_version()}
    if bin_dir:
        v["llama.cpp"] = os.path.basename(os.path.dirname(os.path.dirname(bin_dir)))
    if vllm_py:
        v["vllm"] = run([vllm_py, "-c", "import vllm; print(vllm.__version__)"])
    return v


@contextlib.contextmanager
def servers(args, weights: dict, bin_dir: str | None, vllm_py: str | None, log_dir: str):
    """Start every engine's server; yield {label: base URL}."""
    threads = str(args.threads)
    slots = max(args.num_prompts, 16)
    with contextlib.ExitStack() as stack:
        urls = {}
        xllm = stack.enter_context(launch_xllm(log_dir, "--model", weights["gguf"], "--dtype", args.dtype,
                                               "--served-model-name", "model", "--kv-cache-memory", "2",
                                               "--max-num-seqs", str(slots), threads=args.threads))
        urls["xllm"] = xllm.url
        if "prefix" in args.workloads:  # the same engine without prefix caching, for the prefix workload
            nocache = stack.enter_context(launch_xllm(log_dir, "--model", weights["gguf"], "--dtype", args.dtype,
                                                      "--served-model-name", "model", "--kv-cache-memory", "2",
                                                      "--max-num-seqs", str(slots), "--no-enable-prefix-caching",
                                                      threads=args.threads))
            urls["xllm-nocache"] = nocache.url
        if "llama.cpp" in args.peers and bin_dir:
            port = free_port()
            cmd = [os.path.join(bin_dir, "llama-server"), "-m", weights["llama.cpp"], "--host", "127.0.0.1", "--port", str(port),
                   "-t", threads, "-tb", threads, "-np", str(slots), "-c", str(slots * SLOT_CONTEXT),
                   "--alias", "model", "--no-webui"]
            urls["llama.cpp"] = stack.enter_context(launch(cmd, port, log_dir)).url
        if "vllm" in args.peers and vllm_py:
            port = free_port()
            env_cmd = ["env", "VLLM_CPU_KVCACHE_SPACE=4", f"VLLM_CPU_OMP_THREADS_BIND=0-{args.threads - 1}", "VLLM_TARGET_DEVICE=cpu"]
            cmd = env_cmd + [vllm_py, "-m", "vllm.entrypoints.openai.api_server", "--model", weights["vllm"],
                             "--served-model-name", "model", "--dtype", args.dtype, "--host", "127.0.0.1",
                             "--port", str(port), "--max-model-len", "4096", "--max-num-seqs", str(slots)]
            urls["vllm"] = stack.enter_context(launch(cmd, port, log_dir, timeout=900)).url
        yield urls


def bench(urls: dict, out_dir: str, name: str, **kw) -> dict:
    """One `xllm bench serve` run: its summary JSON in `out_dir`, its requests gzipped in the raw folder."""
    cfg = ServeBenchConfig.create(
        base_urls=tuple(urls.values()), labels=tuple(urls), models=("model",), output=os.path.join(out_dir, f"{name}.json"),
        raw_output=os.path.join(raw_dir(out_dir), f"{name}.json.gz"), **kw,
    )
    return run_benchmark(cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="llama.cpp,vllm", help="comma-separated peers to run beside xLLM")
    ap.add_argument("--dtype", default="float32", choices=sorted(GGUF_TYPES), help="precision for every engine")
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each workload (medians)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rates", default="0.3,0.5,0.7,1", help="request rates of the serving sweep (ShareGPT-like mix)")
    ap.add_argument("--serving-prompts", type=int, default=16)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--workloads", default="offline,decode-1,serving,prefix")
    ap.add_argument("--prefix-len", type=int, default=1024, help="prefix workload: shared system prompt tokens")
    ap.add_argument("--prefix-prompts", type=int, default=32, help="prefix workload: requests, all sent at once")
    ap.add_argument("--quick", action="store_true", help="tiny workloads, 1 repeat: checks the plumbing")
    args = ap.parse_args()
    args.peers = [p for p in args.peers.split(",") if p]
    if args.quick:
        args.repeats, args.num_prompts, args.input_len, args.output_len, args.serving_prompts = 1, 8, 32, 16, 8
        args.rates = "1"
    from xllm.models.loader.resolve import default_model_path

    gguf = args.model or default_model_path()
    bin_dir = llama_cpp_bin() if "llama.cpp" in args.peers else None
    vllm_py = vllm_python() if "vllm" in args.peers else None
    notes = []
    if "llama.cpp" in args.peers and not bin_dir:
        notes.append("llama.cpp skipped: not built (bash benchmarks/peers/build_llama_cpp.sh)")
    if "vllm" in args.peers and not vllm_py:
        notes.append("vLLM skipped: not installed (bash benchmarks/peers/install_vllm.sh)")
    stamp = f"{datetime.datetime.now():%Y-%m-%d-%H%M%S}"
    out_dir = os.path.join(REPO, "benchmarks", "results", f"peers-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(args.threads)
    machine = measure_machine([getattr(torch, args.dtype)], args.threads, quick=args.quick)
    weights = prepare_weights(gguf, args.dtype, out_dir, bin_dir, vllm_py is not None)
    tokenizer = os.path.join(weights.get("vllm") or _hf_folder(gguf, args.dtype), "tokenizer.json")
    workloads = args.workloads.split(",")
    results: dict[str, dict[str, list]] = {w: {} for w in workloads}
    if "prefix" in workloads:
        results["prefix-ttft"] = {}
    latencies: dict[str, list[list[float]]] = {}  # "rate engine" -> per repeat [TTFT p99, TPOT p99, out tok/s]
    with tempfile.TemporaryDirectory() as logs, servers(args, weights, bin_dir, vllm_py, logs) as all_urls:
        urls = {k: v for k, v in all_urls.items() if k != "xllm-nocache"}
        for repeat in range(args.repeats):
            common = dict(tokenizer=tokenizer, seed=repeat, draw_plot=(repeat == args.repeats - 1))
            if "offline" in workloads:
                r = bench(urls, out_dir, f"offline-{repeat}", num_prompts=args.num_prompts, input_len=args.input_len,
                          output_len=args.output_len, **common)
                for run_ in r["runs"]:
                    results["offline"].setdefault(run_["label"], []).append(run_["summary"]["output_throughput"])
            if "decode-1" in workloads:
                r = bench(urls, out_dir, f"decode1-{repeat}", num_prompts=4, input_len=args.input_len,
                          output_len=args.output_len, max_concurrency=1, **common)
                for run_ in r["runs"]:
                    results["decode-1"].setdefault(run_["label"], []).append(run_["summary"]["tpot_ms"]["median"])
            if "serving" in workloads:
                rates = tuple(float(x) for x in args.rates.split(","))
                r = bench(urls, out_dir, f"serving-{repeat}", dataset="sharegpt", num_prompts=args.serving_prompts,
                          request_rates=rates, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, **common)
                for label, best in r["best_rate"].items():
                    results["serving"].setdefault(label, []).append(best["rate"] or 0.0)
                for run_ in r["runs"]:  # the p99s behind each verdict, so other SLOs can be read off
                    s = run_["summary"]
                    latencies.setdefault(f"{run_['request_rate']:g} {run_['label']}", []).append(
                        [s["ttft_ms"]["p99"], s["tpot_ms"]["p99"], s["output_throughput"]])
            if "prefix" in workloads:
                # Each run's prefix is new (a new load point), so the cache starts cold for it.
                r = bench(all_urls, out_dir, f"prefix-{repeat}", dataset="shared-prefix", num_prompts=args.prefix_prompts,
                          prefix_len=args.prefix_len, suffix_len=64, output_len=64, **common)
                for run_ in r["runs"]:
                    results["prefix"].setdefault(run_["label"], []).append(run_["summary"]["output_throughput"])
                    results["prefix-ttft"].setdefault(run_["label"], []).append(run_["summary"]["ttft_ms"]["median"])
            print(f"repeat {repeat + 1}/{args.repeats}: {json.dumps(results)}", flush=True)
    report = render(args, machine, versions(bin_dir, vllm_py), results, os.path.dirname(tokenizer), gguf, notes)
    if latencies:
        report += "\n" + serving_latencies(latencies)
    print(report)
    write_summary(os.path.join(out_dir, "summary.json"), {
        "command": command_line(), "args": vars(args), "machine": machine, "results": results,
        "serving_latencies": latencies, "notes": notes, "raw": os.path.relpath(raw_dir(out_dir), REPO)})
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(report + "\n")
    print(f"wrote {out_dir} (every request: {raw_dir(out_dir)})")
    return 0


def _hf_folder(gguf: str, dtype: str) -> str:
    """A converted HF folder for the tokenizer (exact prompt lengths) when vLLM did not need one."""
    path = os.path.join(PEERS_DIR, "weights", f"{os.path.splitext(os.path.basename(gguf))[0]}-hf-{dtype}")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        run([sys.executable, "-m", "xllm.entrypoints.cli", "convert", gguf, "--to-hf", path, "--dtype", dtype])
    return path


def serving_latencies(latencies: dict[str, list[list[float]]]) -> str:
    """The serving sweep's p99s per rate and engine (medians over repeats)."""
    rows = [["rate (req/s)", "engine", "TTFT p99 ms", "TPOT p99 ms", "output tok/s"]]
    for key, runs in sorted(latencies.items(), key=lambda kv: float(kv[0].split()[0])):
        rate, engine = key.split(" ", 1)
        rows.append([rate, engine] + [f"{statistics.median(r[i] for r in runs):.0f}" for i in range(3)])
    return "serving latencies, medians over repeats:\n" + table(rows)


def render(args, machine: dict, versions_: dict, results: dict, hf_folder: str, gguf: str, notes: list[str]) -> str:
    from xllm.models.arch_config import ArchConfig
    from xllm.models.loader.hf import read_hf_config

    peak = machine["matmul_gflops"][args.dtype]["best"]
    cost = ModelCost.from_arch(ArchConfig.from_hf(read_hf_config(hf_folder)))
    flops_per_output_token = cost.sequence_flops(args.input_len, args.output_len) / args.output_len
    lines = [
        f"xLLM vs peers  {datetime.date.today()}  dtype {args.dtype}, {args.threads} threads, medians of {args.repeats} interleaved repeats",
        f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs; matmul peak {peak:.0f} GFLOP/s; versions: "
        + ", ".join(f"{k} {v}" for k, v in versions_.items()),
        f"model: {os.path.basename(gguf)} (same weights for all engines)",
    ]
    rows = [["workload", "engine", "median", "runs", "xLLM / engine"]]
    units = {"offline": "output tok/s", "decode-1": "ms per token", "serving": "max req/s meeting SLO",
             "prefix": "output tok/s", "prefix-ttft": "median TTFT ms"}
    for workload, by_engine in results.items():
        if not by_engine:
            continue
        xllm = statistics.median(by_engine.get("xllm", [float("nan")]))
        for engine, values in by_engine.items():
            med = statistics.median(values)
            if workload in ("decode-1", "prefix-ttft"):
                ratio = med / xllm if xllm else float("nan")  # times: lower is better
            else:
                ratio = xllm / med if med else float("nan")
            shown = f"{ratio:.2f}x" if ratio == ratio else "n/a"  # NaN: e.g. no engine met the SLO at any rate
            rows.append([f"{workload} ({units[workload]})", engine, f"{med:.3g}", " ".join(f"{v:.3g}" for v in values),
                         "" if engine == "xllm" else shown])
    for engine, values in results.get("offline", {}).items():
        gflops = statistics.median(values) * flops_per_output_token / 1e9
        lines.append(f"offline, {engine}: {gflops:.0f} GFLOP/s effective = {gflops / peak:.1%} of the measured matmul peak")
    return "\n".join(lines + [table(rows)] + notes)


if __name__ == "__main__":
    sys.exit(main())
