"""The printed report of `xllm bench serve`: header, one row per run, the best rate per server."""

from __future__ import annotations

import math

from xllm.bench.report import table
from xllm.bench.serve_workload import ENDPOINTS


def _ms(value: float | None) -> str:
    """Milliseconds with three significant digits, "-" when missing."""
    return "-" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _rate(value: float | None) -> str:
    """A request rate ("inf" for all at once, "-" when missing)."""
    return "-" if value is None else f"{value:g}"


def _verdict(met: bool | None) -> str:
    """yes / no / - (no SLO)."""
    return "-" if met is None else "yes" if met else "no"


def _hit_rate(prefix_cache: dict | None) -> str:
    """Prefix-cache hits as a share of prompt tokens looked up (from the server's /metrics), "-" if unknown."""
    if not prefix_cache or prefix_cache["hit_rate"] is None:
        return "-"
    return f"{100 * prefix_cache['hit_rate']:.0f}%"


def header_lines(report: dict) -> list[str]:
    """Date, machine, workload, arrivals, servers and SLO."""
    cfg, m = report["config"], report["machine"]
    if cfg["dataset"] == "shared-prefix":
        lengths = (f"~{cfg['prefix_len']}-token shared prefix + ~{cfg['suffix_len']}-token question, "
                   f"{cfg['output_len']} output tokens")
    elif cfg["dataset"] == "sharegpt":
        lengths = "ShareGPT-like lognormal lengths (input median ~200, output median ~150 tokens)"
    else:
        spread = f" (+-{100 * cfg['range_ratio']:g}%)" if cfg["range_ratio"] else ""
        lengths = f"~{cfg['input_len']} input, {cfg['output_len']} output tokens{spread}"
    exact = "exact lengths by tokenizer" if cfg["tokenizer"] else "lengths approximate"
    eos = ", EOS ignored" if cfg["ignore_eos"] else ""
    cap = cfg["max_concurrency"]
    if cfg["sweep_auto"]:
        load = (f"Poisson, automatic rate search from {cfg['sweep_start_rate']:g} req/s (doubling up to "
                f"{cfg['sweep_max_rate']:g}, then {cfg['sweep_steps']} bisections)")
    elif cap and all(math.isinf(r) for r in cfg["request_rates"]):
        load = f"closed loop, {cap} clients each sending its next request when the previous one ends"
        cap = None
    else:
        rates = cfg["request_rates"]
        load = f"Poisson at {', '.join(_rate(r) for r in rates)} req/s"
        if any(math.isinf(r) for r in rates):
            load += " (inf = all at once)"
    load += f", at most {cap} in flight" if cap else ""
    lines = [
        f"xLLM serve benchmark  {m['date']}{'  (quick)' if cfg['quick'] else ''}",
        f"client: {m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}",
        f"workload: {cfg['num_prompts']} requests per run, {cfg['dataset']} dataset: {lengths} ({exact}); "
        f"{ENDPOINTS[cfg['endpoint']]}, streamed, greedy{eos}",
        f"arrivals: {load}; {cfg['warmup']} untimed warm-up request(s) per server",
    ]
    lines += [f"server {s['label']}: {s['base_url']}, model {s['model']}" for s in report["servers"]]
    slo = report["slo"]
    if slo:
        bounds = [f"{name} <= {slo[key]:g} ms" for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"),
                                                                  ("E2E", "e2e_ms")) if slo[key] is not None]
        lines.append(f"SLO: {', '.join(bounds)}; {slo['rule']}")
    return lines


def runs_table(report: dict) -> str:
    """One row per server and rate: counts, throughputs, latency medians and p99s, goodput, verdict."""
    rows = [[
        "server", "rate", "done", "failed", "req/s", "out tok/s", "total tok/s", "TTFT p50", "TTFT p99",
        "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99", "goodput", "SLO", "prefix hit",
    ]]
    order = {s["label"]: i for i, s in enumerate(report["servers"])}
    for run in sorted(report["runs"], key=lambda r: (order[r["label"]], r["request_rate"])):
        s = run["summary"]
        rows.append([
            run["label"],
            _rate(run["request_rate"]),
            str(s["completed"]),
            str(s["failed"]),
            f"{s['request_throughput']:.3g}",
            f"{s['output_throughput']:.1f}",
            f"{s['total_token_throughput']:.1f}",
            *(_ms(s[metric][q]) for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms") for q in ("median", "p99")),
            "-" if s["goodput"] is None else f"{s['goodput']:.3g}",
            _verdict(s["meets_slo"]),
            _hit_rate(s.get("prefix_cache")),
        ])
    return table(rows)


def best_lines(report: dict) -> list[str]:
    """The highest request rate that met the SLO, per server."""
    lines = []
    for label, best in report["best_rate"].items():
        if best["rate"] is None:
            lines.append(f"  {label}: no rate tried met the SLO")
        else:
            capped = " (every rate tried met it: the limit is higher)" if best["capped"] else ""
            lines.append(f"  {label}: {_rate(best['rate'])} req/s{capped}")
    return lines


def format_report(report: dict) -> str:
    """The whole printed report."""
    lines = [
        *header_lines(report),
        "",
        "Runs (rate and goodput in req/s, latencies in ms: TTFT to first text, TPOT per later token, "
        "ITL between chunks, E2E whole request; prefix hit: prompt tokens found in the server's prefix cache)",
        runs_table(report),
    ]
    if report["best_rate"]:
        lines += ["", "Highest request rate meeting the SLO", *best_lines(report)]
    return "\n".join(lines)
