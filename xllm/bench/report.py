"""The printed form of a benchmark report: a machine header, then aligned tables."""

from __future__ import annotations


def table(rows: list[list[str]]) -> str:
    """Rows of cells as text columns, each as wide as its widest cell; the first row is the header."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _runs(values: list[float]) -> str:
    """Every run's figure, one decimal each."""
    return " ".join(f"{v:.1f}" for v in values)


def _pct(fraction: float) -> str:
    """A fraction as a percentage with three significant digits (0.4%, 61.2%)."""
    return f"{100 * fraction:.3g}%"


def machine_lines(report: dict) -> list[str]:
    """Who, where, and the machine's measured matmul rate and memory bandwidth."""
    m, cfg = report["machine"], report["config"]
    bw = m["bandwidth_gbs"]
    matmul = ", ".join(f"{d} {r['best']:.1f} best ({r['median']:.1f} median)" for d, r in m["matmul_gflops"].items())
    pages = f"{bw['plain']['median']:.1f} GB/s with 4 KiB pages"
    if "huge_pages" in bw:
        pages += f", {bw['huge_pages']['median']:.1f} GB/s with 2 MiB pages (THP {m['thp_mode']})"
    lines = [
        f"xLLM offline benchmark  {m['date']}{'  (quick)' if cfg['quick'] else ''}",
        f"machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['threads']} threads, torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}",
        f"  cpu flags: {' '.join(m['cpu_flags']) or 'none of interest'}",
        f"  matmul {next(iter(m['matmul_gflops'].values()))['n']}^3 (x @ W.T), GFLOP/s: {matmul}",
        f"  memory read (x.sum over {bw['gib']:g} GiB float32), median: {pages}",
    ]
    model = report["model"]
    if model:
        tied = "tied embeddings" if model["tied_embeddings"] else "separate lm_head"
        lines.append(
            f"model: {model['name']}, {model['total_params'] / 1e6:.1f}M parameters ({tied}), "
            f"{model['flops_per_token'] / 1e9:.3g} GFLOP per sampled token"
        )
    lines.append(
        f"workload: {cfg['num_prompts']} prompts x {cfg['input_len']} input tokens, {cfg['output_len']} output "
        f"tokens each (greedy, EOS ignored); {cfg['repeats']} interleaved repeats, medians"
    )
    return lines


def batched_table(report: dict) -> str:
    """Output and total tok/s, every run, effective GFLOP/s and compute-roofline fraction per engine."""
    rows = [["dtype", "engine", "output tok/s", "total tok/s", "runs (output tok/s)", "GFLOP/s", "roofline", "of"]]
    for dtype, result in report["results"].items():
        b = result["batched"]
        for name, e in b["engines"].items():
            rows.append([
                dtype,
                name,
                f"{e['median_output_tok_s']:.1f}",
                f"{e['median_total_tok_s']:.1f}",
                _runs(e["output_tok_s"]),
                f"{e['effective_gflops']:.3g}",
                _pct(e["compute_roofline_fraction"]),
                f"{b['peak_gflops']:.3g} GFLOP/s",
            ])
    return table(rows)


def decode_table(report: dict) -> str:
    """Batch-1 decode tok/s, every run, and the bandwidth-roofline fraction per engine."""
    rows = [["dtype", "engine", "decode tok/s", "runs", "roofline", "of", "bytes/token", "at"]]
    for dtype, result in report["results"].items():
        d = result["decode_batch1"]
        for name, e in d["engines"].items():
            rows.append([
                dtype,
                name,
                f"{e['median_tok_s']:.1f}",
                _runs(e["tok_s"]),
                _pct(e["bandwidth_roofline_fraction"]),
                f"{d['roofline_tok_s']:.1f} tok/s",
                f"{d['bytes_per_token'] / 1e6:.3g} MB",
                f"{d['bandwidth_gbs']:.3g} GB/s",
            ])
    return table(rows)


def summary_table(report: dict) -> str:
    """Per dtype, xLLM over transformers (ratio of medians): batched, against its target; batch-1 decode."""
    rows = [["dtype", "batched ratio", "target", "result", "decode b=1 ratio", "same greedy output"]]
    for dtype, result in report["results"].items():
        b, d = result["batched"], result["decode_batch1"]
        if b["ratio"] is None:
            rows.append([dtype, "- (no peer)"])
            continue
        target = "-" if b["target"] is None else f">={b['target']:g}x"
        verdict = "-" if b["pass"] is None else ("PASS" if b["pass"] else "FAIL")
        same = _pct(b["same_output_fraction"]) + " of prompts"
        rows.append([dtype, f"{b['ratio']:.2f}x", target, verdict, f"{d['ratio']:.2f}x", same])
    return table(rows)


def format_report(report: dict) -> str:
    """The whole printed report."""
    cfg = report["config"]
    return "\n".join([
        *machine_lines(report),
        "",
        "Batched throughput and compute roofline (output tok/s = prompts x output tokens / wall time; medians)",
        batched_table(report),
        "",
        f"Batch-1 decode and bandwidth roofline ({cfg['input_len']}-token prompt, {cfg['output_len']} decode steps, "
        "prefill excluded)",
        decode_table(report),
        "",
        "xLLM / transformers (ratio of medians)",
        summary_table(report),
    ])
