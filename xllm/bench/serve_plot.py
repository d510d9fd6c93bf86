"""The PNG of `xllm bench serve`: TTFT, TPOT and output throughput against request rate, a line per server."""

from __future__ import annotations

import math
import os

# (summary key, panel title, y label, percentiles) of each panel: a latency panel draws its p50
# solid and its p99 dashed, a throughput panel its one figure.
PANELS = (
    ("ttft_ms", "Time to first token", "ms", True),
    ("tpot_ms", "Time per output token", "ms", True),
    ("output_throughput", "Output throughput", "tokens/s", False),
)


def _x(run: dict, achieved: bool) -> float:
    """A run's position on the x axis: its offered rate, or its achieved request throughput."""
    return run["summary"]["request_throughput"] if achieved else run["request_rate"]


def _y(value: float | None) -> float:
    """A figure to plot: NaN (a gap) where the run had none."""
    return math.nan if value is None else value


def plot_report(report: dict, path: str) -> str:
    """Draw the report's runs to `path` (a PNG, folders created); return the path.

    The x axis is the offered request rate; when a run offered an infinite rate (all at once, or a
    closed loop), every point sits at its achieved request throughput instead. SLO bounds are
    dashed grey lines; a single rate point still shows as markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    achieved = any(math.isinf(run["request_rate"]) for run in runs)
    slo = report["slo"] or {}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, server in enumerate(report["servers"]):
        own = sorted((r for r in runs if r["label"] == server["label"]), key=lambda r: _x(r, achieved))
        xs = [_x(r, achieved) for r in own]
        color = colors[i % len(colors)]
        for ax, (key, _, _, percentiles) in zip(axes[0], PANELS):
            values = [r["summary"][key] for r in own]
            if percentiles:
                ax.plot(xs, [_y(v["median"]) for v in values], "o-", color=color, label=f"{server['label']} p50")
                ax.plot(xs, [_y(v["p99"]) for v in values], "s--", color=color, label=f"{server['label']} p99")
            else:
                ax.plot(xs, values, "o-", color=color, label=server["label"])
    for ax, (key, title, unit, _) in zip(axes[0], PANELS):
        if slo.get(key) is not None:
            ax.axhline(slo[key], color="grey", linestyle="--", linewidth=1, label=f"SLO {slo[key]:g} ms")
        heights = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
        ax.set_ylim(0, 1.15 * max(heights) if heights and max(heights) > 0 else 1)  # from 0, with headroom
        ax.set_title(title)
        ax.set_xlabel("achieved request rate (req/s)" if achieved else "request rate (req/s)")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    date = report["machine"]["date"]
    fig.suptitle(f"xLLM serve benchmark, {report['config']['dataset']} dataset, {date}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
