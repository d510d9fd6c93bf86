"""The statistics of `xllm bench serve`, free of any network code so that they are unit-tested alone.

Per-request metrics from the times a client saw (send, each chunk carrying text, end), their
percentiles, a run's summary with goodput against a service-level objective (SLO), Poisson arrival
offsets, and the search for the highest request rate that meets the SLO.

Definitions (times in seconds in the records, milliseconds in the summaries):

- TTFT: first chunk carrying text - send time.
- E2E latency: end of the stream - send time.
- TPOT: (E2E - TTFT) / (output tokens - 1), for successful requests with at least 2 output tokens.
- ITL: every gap between consecutive text chunks of a successful request, pooled over the run.
- Percentiles interpolate linearly between the two nearest ranks (numpy's default, "linear"):
  the q-th percentile of sorted x[0..n-1] is at rank q/100 * (n - 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

# How a run is judged against the SLO (also printed in the report).
SLO_RULE = (
    "a run meets the SLO when every request completed and its p99 TTFT, p99 TPOT (and p99 E2E) "
    "are within the bounds; goodput = requests individually within every bound, per second"
)


@dataclass
class RequestRecord:
    """What the client saw of one request; times in seconds from the start of its run."""

    index: int  # position in the run's request list
    input_len: int  # prompt tokens asked for (approximate without a tokenizer)
    output_len: int  # max_tokens sent
    send_s: float
    end_s: float
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    output_tokens: int = 0  # from the final usage chunk when present, else the number of text chunks
    prompt_tokens: int | None = None  # from the final usage chunk, when present
    status: int | None = None  # HTTP status; None when no response came
    error: str | None = None  # None = success

    @property
    def success(self) -> bool:
        """True when the stream ended normally with text in it."""
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        """Time to the first text chunk (None without one)."""
        return self.chunk_s[0] - self.send_s if self.chunk_s else None

    @property
    def e2e_s(self) -> float:
        """Send to end of the stream."""
        return self.end_s - self.send_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None when failed or under 2 tokens)."""
        ttft = self.ttft_s
        if not self.success or ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - ttft) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive text chunks."""
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """Mean, median, p90 and p99 of values in seconds, as milliseconds (None each when empty)."""
    ms = [1000 * s for s in seconds]
    return {
        "mean": sum(ms) / len(ms) if ms else None,
        "median": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
    }


@dataclass(frozen=True)
class SLO:
    """Latency bounds in milliseconds; a bound left None is not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def active(self) -> bool:
        """True when at least one bound is set."""
        return any(b is not None for b in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def _bounds(self) -> list[tuple[str, float]]:
        """(summary key, bound) of each bound that is set."""
        pairs = [("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms), ("e2e_ms", self.e2e_ms)]
        return [(key, bound) for key, bound in pairs if bound is not None]

    def request_meets(self, record: RequestRecord) -> bool:
        """A successful request whose own TTFT, TPOT (when it has one) and E2E are within the bounds."""
        if not record.success:
            return False
        seconds = {"ttft_ms": record.ttft_s, "tpot_ms": record.tpot_s, "e2e_ms": record.e2e_s}
        return all(seconds[key] is None or 1000 * seconds[key] <= bound for key, bound in self._bounds())

    def run_meets(self, summary: dict) -> bool:
        """The run rule (SLO_RULE): no failed request, and each bounded metric's p99 within its bound.

        A metric without values (TPOT when every request produced one token) does not fail the run.
        """
        if summary["completed"] == 0 or summary["failed"] > 0:
            return False
        return all(summary[key]["p99"] is None or summary[key]["p99"] <= bound for key, bound in self._bounds())


def summarize_run(records: Sequence[RequestRecord], duration_s: float, slo: SLO | None = None) -> dict:
    """A run's counts, throughputs, latency distributions and, with an active SLO, goodput and verdict.

    Throughputs divide by `duration_s` (start of the run to the end of its last request). Input
    tokens are the server's usage figures where it sent them, else the lengths asked for.
    """
    done = [r for r in records if r.success]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary: dict = {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done]),
        "slo_attained_fraction": None,
        "goodput": None,
        "meets_slo": None,
    }
    if slo is not None and slo.active:
        good = sum(slo.request_meets(r) for r in records)
        summary["slo_attained_fraction"] = good / len(records) if records else None
        summary["goodput"] = good / duration_s
        summary["meets_slo"] = slo.run_meets(summary)
    return summary


def arrival_offsets(num_requests: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Send times in seconds from the run's start for a Poisson process at `rate` requests/s.

    The first request goes at 0, each next one after an exponential gap of mean 1/rate; an
    infinite rate sends everything at 0.
    """
    if num_requests == 0:
        return []
    if math.isinf(rate):
        return [0.0] * num_requests
    if rate <= 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    gaps = rng.exponential(1 / rate, size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


@dataclass
class RateSearch:
    """The outcome of `search_max_rate`."""

    best_rate: float | None  # highest rate that passed; None when none did
    capped: bool  # every rate up to max_rate passed: the true limit is at least max_rate
    evaluations: list[tuple[float, bool]]  # (rate, passed) in the order they were run


def search_max_rate(
    evaluate: Callable[[float], bool], start_rate: float, max_rate: float, bisect_steps: int
) -> RateSearch:
    """Find the highest request rate for which `evaluate(rate)` is True, assuming it is monotone.

    Double from `start_rate` while it passes (the last step clipped to `max_rate`; passing
    `max_rate` ends the search, capped). Then bisect `bisect_steps` times between the last passing
    rate and the first failing one; when `start_rate` already fails, between 0 and `start_rate`.
    After n steps the answer is within (first failing - last passing) / 2**n below the true limit.
    """
    if not 0 < start_rate <= max_rate:
        raise ValueError(f"need 0 < start rate <= max rate, got {start_rate} and {max_rate}")
    evaluations: list[tuple[float, bool]] = []

    def run(rate: float) -> bool:
        passed = bool(evaluate(rate))
        evaluations.append((rate, passed))
        return passed

    passing, rate = 0.0, start_rate
    while run(rate):
        passing = rate
        if rate >= max_rate:
            return RateSearch(best_rate=rate, capped=True, evaluations=evaluations)
        rate = min(2 * rate, max_rate)
    failing = rate
    for _ in range(bisect_steps):
        middle = (passing + failing) / 2
        if run(middle):
            passing = middle
        else:
            failing = middle
    return RateSearch(best_rate=passing or None, capped=False, evaluations=evaluations)


def prefix_cache_counters(metrics_text: str) -> tuple[float, float] | None:
    """Sum the prefix-cache query and hit counters (any engine prefix, any labels) in Prometheus text."""
    totals = {"queries": 0.0, "hits": 0.0}
    seen = False
    try:
        for family in text_string_to_metric_families(metrics_text):
            kind = family.name.rsplit(":", 1)[-1].removesuffix("_total")
            if kind in ("prefix_cache_queries", "prefix_cache_hits"):
                seen = True
                totals[kind.removeprefix("prefix_cache_")] += sum(
                    x.value for x in family.samples if x.name.endswith("_total")
                )
    except ValueError:  # not Prometheus text
        return None
    return (totals["queries"], totals["hits"]) if seen else None


def prefix_cache_delta(before: tuple[float, float], after: tuple[float, float]) -> dict:
    """What a run added to a server's prefix-cache counters: tokens queried, hit, and the hit rate."""
    queried, hit = after[0] - before[0], after[1] - before[1]
    return {"queried_tokens": queried, "hit_tokens": hit, "hit_rate": hit / queried if queried else None}
