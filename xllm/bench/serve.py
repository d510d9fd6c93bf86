"""`xllm bench serve`: load-test any OpenAI-compatible server (xLLM, vLLM, llama.cpp's llama-server).

Streams seeded synthetic requests to /v1/completions or /v1/chat/completions and times what a
client sees: TTFT, TPOT, ITL and end-to-end latency (mean, median, p90, p99), request and token
throughputs, and goodput against latency bounds (SLO). Requests arrive as a Poisson process at
--request-rate (inf = all at once), optionally capped at --max-concurrency in flight (with an
infinite rate: a closed loop of that many clients). --sweep runs every rate of --rates, --sweep-auto
searches the highest rate that meets the SLO; several --base-url servers run interleaved at each
rate. Prints a table, writes every run's figures to a summary JSON (with the command line), every
request to a gzipped raw JSON in the ignored raw/ folder beside it, and draws the curves to a PNG.

Prompts are made of common English words, about one token each: their lengths are approximate
(exact with --tokenizer), and the server's own prompt-token counts are reported. No downloads.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import itertools
import logging
import math
import os
import platform
from dataclasses import dataclass

from xllm.bench.results import RESULTS_DIR, command_line, raw_path, write_raw, write_summary
from xllm.bench.serve_client import ServerClient, default_label, normalize_base_url
from xllm.bench.serve_report import format_report
from xllm.bench.serve_stats import (
    SLO,
    SLO_RULE,
    RateSearch,
    prefix_cache_delta,
    search_max_rate,
    summarize_run,
)
from xllm.bench.serve_workload import DATASETS, ENDPOINTS, Workload

logger = logging.getLogger(__name__)

QUICK = dict(num_prompts=8, input_len=32, output_len=16, prefix_len=64, suffix_len=16, sweep_steps=2)

@dataclass(frozen=True)
class ServeBenchConfig:
    """One `xllm bench serve` invocation: servers, workload, load points, SLO and output files."""

    base_urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    labels: tuple[str, ...] = ()  # one per base URL; () = each URL's host:port (and path)
    models: tuple[str, ...] = ()  # () = each server's first /v1/models id; one for all; or one per URL
    endpoint: str = "completions"  # a key of ENDPOINTS
    api_key: str | None = None  # sent as "Authorization: Bearer <key>"
    dataset: str = "random"  # one of DATASETS
    num_prompts: int = 100  # requests per run
    input_len: int = 128  # random: mean prompt tokens
    output_len: int = 128  # max_tokens of random (the mean) and shared-prefix requests
    range_ratio: float = 0.0  # random: lengths uniform within +-ratio of input_len and output_len
    prefix_len: int = 256  # shared-prefix: tokens of the system prompt every request shares
    suffix_len: int = 32  # shared-prefix: tokens of each request's own question
    tokenizer: str | None = None  # a tokenizer.json: exact prompt lengths instead of ~1 token per word
    request_rates: tuple[float, ...] = (math.inf,)  # requests/s of each load point; inf = all at once
    max_concurrency: int | None = None  # most requests in flight; None = no cap
    sweep_auto: bool = False  # search the highest rate meeting the SLO instead of request_rates
    sweep_start_rate: float = 1.0
    sweep_max_rate: float = 256.0
    sweep_steps: int = 4  # bisection steps after the doubling phase
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    ignore_eos: bool = True  # send "ignore_eos": true (a vLLM/xLLM/llama.cpp extension)
    warmup: int = 1  # untimed requests per server before its first run
    timeout_s: float = 600.0  # limit of one request
    seed: int = 0  # of the prompts and the arrival times
    quick: bool = False  # a tiny workload, for development
    output: str | None = None  # summary JSON path; None = benchmarks/results/serve-<date>-<time>.json
    raw_output: str | None = None  # raw JSON.gz path (every request); None = raw/<name>.gz beside the summary
    plot: str | None = None  # PNG path; None = the JSON path with .png
    draw_plot: bool = True

    @classmethod
    def create(cls, quick: bool = False, **overrides) -> ServeBenchConfig:
        """The defaults, the quick preset over them when `quick`, then every override that is not None."""
        values = dict(QUICK) if quick else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(quick=quick, **values)

    @property
    def slo(self) -> SLO:
        """The latency bounds (inactive when none is set)."""
        return SLO(self.slo_ttft_ms, self.slo_tpot_ms, self.slo_e2e_ms)

    def check(self) -> None:
        """Raise ValueError on settings that cannot run, before any request is sent."""
        servers = len(self.base_urls)
        problems = [
            (servers == 0, "give at least one base URL"),
            (len(self.labels) not in (0, servers), f"give one label per base URL ({servers}), or none"),
            (len(set(self.labels)) != len(self.labels), "labels must differ"),
            (len(self.models) not in (0, 1, servers), f"give one model for all, one per base URL ({servers}), or none"),
            (self.endpoint not in ENDPOINTS, f"endpoint must be one of {', '.join(ENDPOINTS)}"),
            (self.dataset not in DATASETS, f"dataset must be one of {', '.join(DATASETS)}"),
            (min(self.num_prompts, self.input_len, self.output_len, self.suffix_len) < 1,
             "num_prompts, input_len, output_len and suffix_len must be at least 1"),
            (min(self.prefix_len, self.warmup, self.seed) < 0, "prefix_len, warmup and seed cannot be negative"),
            (not 0 <= self.range_ratio < 1, "range_ratio must be in [0, 1)"),
            (not self.request_rates or min(self.request_rates) <= 0, "request rates must be positive"),
            (self.max_concurrency is not None and self.max_concurrency < 1, "max_concurrency must be at least 1"),
            (self.sweep_auto and not self.slo.active, "an automatic sweep needs an SLO bound (TTFT, TPOT or E2E)"),
            (not 0 < self.sweep_start_rate <= self.sweep_max_rate, "need 0 < sweep start rate <= sweep max rate"),
            (self.sweep_steps < 0, "sweep_steps cannot be negative"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message)


# --- the benchmark ----------------------------------------------------------------------------


def machine_line() -> dict:
    """Where the client ran: platform, CPUs, Python, date."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def server_specs(cfg: ServeBenchConfig) -> list[tuple[str, str, str | None]]:
    """(base URL, label, model or None) of each server; equal derived labels get #2, #3, ..."""
    labels = list(cfg.labels) or [default_label(normalize_base_url(url)) for url in cfg.base_urls]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label}#{seen[label]}"
    models: list[str | None] = list(cfg.models) * len(cfg.base_urls) if len(cfg.models) == 1 else list(cfg.models)
    models = models or [None] * len(cfg.base_urls)
    return list(zip(cfg.base_urls, labels, models))


def search_summary(search: RateSearch) -> dict:
    """A server's best rate as the report holds it."""
    return {
        "rate": search.best_rate,
        "capped": search.capped,
        "evaluations": [{"rate": rate, "meets_slo": met} for rate, met in search.evaluations],
    }


def run_benchmark(config: ServeBenchConfig) -> dict:
    """Warm up and measure every server, write the JSON (and the PNG); return the report.

    With fixed rates, every rate is run on each server in turn before the next rate (interleaved);
    an automatic sweep searches each server's rate in turn. Runs its own event loop, so call it
    from synchronous code. The report's top-level keys: command (the running command line), config,
    machine, slo (None without bounds), servers, runs (each with its summary and per-request
    records), best_rate (per label, with an SLO), files (the summary JSON, raw JSON.gz and PNG
    paths). The summary JSON holds all of it but the per-request records; the raw file holds all.
    """
    config.check()
    workload = Workload(config)
    slo = config.slo
    report: dict = {
        "command": command_line(),
        "config": dataclasses.asdict(config),
        "machine": machine_line(),
        "slo": {**dataclasses.asdict(slo), "rule": SLO_RULE} if slo.active else None,
        "servers": [],
        "runs": [],
        "best_rate": {},
        "files": {},
    }
    with asyncio.Runner() as runner:
        clients: list[ServerClient] = []

        def measure(client: ServerClient, rate: float, point: int) -> dict:
            """One run of load point `point` at `rate` on `client`: add it to the report, return its summary."""
            load = client.run_load(workload.requests(point), workload.arrivals(rate, point), config.max_concurrency)
            before = runner.run(client.prefix_cache_counters())
            records, duration = runner.run(load)
            after = runner.run(client.prefix_cache_counters())
            summary = summarize_run(records, duration, slo)
            if before is not None and after is not None:
                summary["prefix_cache"] = prefix_cache_delta(before, after)
            report["runs"].append({
                "label": client.label,
                "request_rate": rate,
                "max_concurrency": config.max_concurrency,
                "point": point,
                "summary": summary,
                "requests": [dataclasses.asdict(r) for r in records],
            })
            verdict = "" if summary["meets_slo"] is None else f", SLO {'met' if summary['meets_slo'] else 'missed'}"
            logger.info(
                "%s at %g req/s: %d completed, %d failed, %.2f req/s, %.1f output tok/s%s", client.label, rate,
                summary["completed"], summary["failed"], summary["request_throughput"], summary["output_throughput"],
                verdict,
            )
            return summary

        def sweep(client: ServerClient) -> RateSearch:
            """The automatic search of `client`'s highest rate meeting the SLO; each try is a new load point."""
            points = itertools.count()
            return search_max_rate(
                lambda rate: bool(measure(client, rate, next(points))["meets_slo"]),
                config.sweep_start_rate,
                config.sweep_max_rate,
                config.sweep_steps,
            )

        try:
            for url, label, model in server_specs(config):
                clients.append(ServerClient(url, label, config, model))
                runner.run(clients[-1].open())
                runner.run(clients[-1].warm_up(workload.warmup_requests()))
                report["servers"].append({"label": label, "base_url": clients[-1].base_url, "model": clients[-1].model})
            if config.sweep_auto:
                for client in clients:
                    report["best_rate"][client.label] = search_summary(sweep(client))
            else:
                results: dict[str, list[tuple[float, bool]]] = {c.label: [] for c in clients}
                for point, rate in enumerate(config.request_rates):
                    for client in clients:
                        results[client.label].append((rate, bool(measure(client, rate, point)["meets_slo"])))
                if slo.active:
                    for label, evaluations in results.items():
                        met = [rate for rate, ok in evaluations if ok]
                        best = RateSearch(max(met, default=None), len(met) == len(evaluations), evaluations)
                        report["best_rate"][label] = search_summary(best)
        finally:
            for client in clients:
                runner.run(client.close())
    write_outputs(report, config)
    return report


def default_output_path(now: datetime.datetime | None = None) -> str:
    """benchmarks/results/serve-<date>-<time>.json under the current directory."""
    stamp = f"{now or datetime.datetime.now():%Y-%m-%d-%H%M%S}"
    return os.path.join(RESULTS_DIR, f"serve-{stamp}.json")


def summary_of(report: dict) -> dict:
    """The report without the per-request records (what the summary JSON holds)."""
    runs = [{k: v for k, v in run.items() if k != "requests"} for run in report["runs"]]
    return {**report, "runs": runs}


def write_outputs(report: dict, cfg: ServeBenchConfig) -> None:
    """Draw the PNG (unless disabled), write the summary JSON and the raw JSON.gz, creating folders;
    record the three paths in `report`."""
    json_path = cfg.output or default_output_path()
    plot_path = None
    if cfg.draw_plot:
        from xllm.bench.serve_plot import plot_report

        plot_path = plot_report(report, cfg.plot or os.path.splitext(json_path)[0] + ".png")
    report["files"] = {"json": json_path, "raw": cfg.raw_output or raw_path(json_path), "plot": plot_path}
    write_summary(json_path, summary_of(report))
    write_raw(report["files"]["raw"], report)


# --- command line -----------------------------------------------------------------------------


def parse_rates(text: str) -> tuple[float, ...]:
    """"1,2,4,inf" -> (1.0, 2.0, 4.0, inf)."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text!r}") from None


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `xllm bench serve`."""
    d = ServeBenchConfig()
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    g = parser.add_argument_group("servers")
    g.add_argument("--base-url", action="append", metavar="URL",
                   help=f"server to load, repeatable to compare several (default {d.base_urls[0]})")
    g.add_argument("--label", action="append", metavar="NAME",
                   help="name of each --base-url in the report and plot, in order (default: host:port)")
    g.add_argument("--model", action="append", metavar="NAME",
                   help="model name sent in the body: once for all servers or once per --base-url "
                        "(default: the first id of each server's /v1/models)")
    g.add_argument("--endpoint", choices=list(ENDPOINTS), default=d.endpoint,
                   help=f"completions = {ENDPOINTS['completions']} with a prompt, chat = {ENDPOINTS['chat']} "
                        f"(default {d.endpoint})")
    g.add_argument("--api-key", metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send \"ignore_eos\": true (for servers that reject it; outputs may end early)")
    g.add_argument("--timeout", type=float, metavar="S",
                   help=f"limit of one request in seconds (default {d.timeout_s:g})")
    g = parser.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="random: uniform lengths around --input-len/--output-len; sharegpt: a ShareGPT-like "
                        "lognormal length mix; shared-prefix: one --prefix-len system prompt + a --suffix-len "
                        f"question per request (default {d.dataset})")
    g.add_argument("--num-prompts", type=int, help=f"requests per run (default {d.num_prompts})")
    g.add_argument("--input-len", type=int, help=f"random: prompt tokens, about (default {d.input_len})")
    g.add_argument("--output-len", type=int, help=f"random, shared-prefix: max_tokens (default {d.output_len})")
    g.add_argument("--range-ratio", type=float,
                   help=f"random: lengths uniform within +-this fraction of the means (default {d.range_ratio:g})")
    g.add_argument("--prefix-len", type=int,
                   help=f"shared-prefix: tokens of the shared prompt (default {d.prefix_len})")
    g.add_argument("--suffix-len", type=int, help=f"shared-prefix: tokens of each question (default {d.suffix_len})")
    g.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json: prompts of exact token lengths")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of the prompts and arrival times (default {d.seed})")
    g.add_argument("--warmup", type=int, metavar="N", help=f"untimed requests per server first (default {d.warmup})")
    g = parser.add_argument_group("load")
    g.add_argument("--request-rate", type=float, metavar="R",
                   help="Poisson arrivals at R requests/s; inf = all at once (default inf)")
    g.add_argument("--max-concurrency", type=int, metavar="C",
                   help="at most C requests in flight; with rate inf, C clients each sending its next "
                        "request when the previous one ends (default: no cap)")
    g.add_argument("--sweep", action="store_true", help="run every rate of --rates (default 1,2,4,8)")
    g.add_argument("--rates", type=parse_rates, metavar="R1,R2,...", help="rates of --sweep (implies it)")
    g.add_argument("--sweep-auto", action="store_true",
                   help="search each server's highest rate meeting the SLO: double from --sweep-start-rate "
                        "until it fails, then bisect --sweep-steps times")
    g.add_argument("--sweep-start-rate", type=float, metavar="R",
                   help=f"the search's first rate (default {d.sweep_start_rate:g})")
    g.add_argument("--sweep-max-rate", type=float, metavar="R",
                   help=f"the search stops here (default {d.sweep_max_rate:g})")
    g.add_argument("--sweep-steps", type=int, metavar="N", help=f"bisection steps (default {d.sweep_steps})")
    g = parser.add_argument_group("SLO (a run meets it when no request failed and each bound holds at p99)")
    g.add_argument("--slo-ttft-ms", type=float, metavar="MS", help="bound on time to first token")
    g.add_argument("--slo-tpot-ms", type=float, metavar="MS", help="bound on time per output token")
    g.add_argument("--slo-e2e-ms", type=float, metavar="MS", help="bound on end-to-end latency")
    g = parser.add_argument_group("output")
    g.add_argument("--output", metavar="PATH",
                   help="summary JSON, every run's figures but no requests "
                        "(default benchmarks/results/serve-<date>-<time>.json)")
    g.add_argument("--raw-output", metavar="PATH",
                   help="gzipped JSON of every request (default: raw/<name>.gz in the summary's folder; "
                        "git ignores benchmarks/results/**/raw/)")
    g.add_argument("--plot", metavar="PATH", help="PNG file (default: the JSON path with .png)")
    g.add_argument("--no-plot", action="store_true", help="draw no PNG")
    g.add_argument("--quick", action="store_true", help=f"tiny run for development: {quick}")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity on stderr; info logs each run as it ends (default info)")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    """A `ServeBenchConfig` from parsed `add_serve_args` flags; ValueError on conflicting flags."""
    if args.sweep_auto and (args.sweep or args.rates or args.request_rate is not None):
        raise ValueError("--sweep-auto picks its own rates: drop --sweep, --rates and --request-rate")
    if (args.sweep or args.rates) and args.request_rate is not None:
        raise ValueError("give either --request-rate or --sweep/--rates")
    if args.sweep or args.rates:
        rates = args.rates or (1.0, 2.0, 4.0, 8.0)
    else:
        rates = None if args.request_rate is None else (args.request_rate,)
    return ServeBenchConfig.create(
        quick=args.quick,
        base_urls=tuple(args.base_url) if args.base_url else None,
        labels=tuple(args.label) if args.label else None,
        models=tuple(args.model) if args.model else None,
        endpoint=args.endpoint,
        api_key=args.api_key,
        dataset=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        tokenizer=args.tokenizer,
        request_rates=rates,
        max_concurrency=args.max_concurrency,
        sweep_auto=args.sweep_auto,
        sweep_start_rate=args.sweep_start_rate,
        sweep_max_rate=args.sweep_max_rate,
        sweep_steps=args.sweep_steps,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        slo_e2e_ms=args.slo_e2e_ms,
        ignore_eos=not args.no_ignore_eos,
        warmup=args.warmup,
        timeout_s=args.timeout,
        seed=args.seed,
        output=args.output,
        raw_output=args.raw_output,
        plot=args.plot,
        draw_plot=not args.no_plot,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed flags: print the table, write the JSONs and the PNG."""
    report = run_benchmark(config_from_args(args))
    print(format_report(report))
    files = report["files"]
    print(f"\nwritten: {files['json']}" + (f", {files['plot']}" if files["plot"] else "") + f"; raw: {files['raw']}")
    return 0
