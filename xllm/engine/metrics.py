"""Prometheus metrics of a serving engine, in a registry of its own.

Gauges and the preemption count are read from the engine when /metrics is scraped; token
counters and latency histograms are recorded by `AsyncLLM` as outputs reach their streams, so
the latencies are the ones a client sees, minus the network.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Bucket bounds in seconds, fine at the low end where a CPU engine's decode steps live.
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineStateCollector(Collector):
    """Running/waiting requests, KV-cache usage, preemptions and prefix-cache counts, read at scrape time."""

    def __init__(self, model_name: str, state: Callable[[], dict]):
        self.model_name = model_name
        self.state = state

    def collect(self):
        s = self.state()
        for name, doc, key in (
            ("xllm:num_requests_running", "Requests in the running batch.", "running"),
            ("xllm:num_requests_waiting", "Requests waiting to be scheduled.", "waiting"),
            ("xllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", "kv_usage"),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], s[key])
            yield g
        for name, doc, key in (
            ("xllm:num_preemptions", "Preemptions (a running request gave up its KV blocks).", "preemptions"),
            ("xllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            ("xllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed).", "prefix_cache_hits"),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model_name], s[key])
            yield c
        if s.get("tier_hits"):
            c = CounterMetricFamily(
                "xllm:prefix_cache_tier_hits", "Prompt tokens promoted from a lower prefix-cache tier.", labels=["model_name", "tier"]
            )
            for tier, tokens in s["tier_hits"].items():
                c.add_metric([self.model_name, tier], tokens)
            yield c


class EngineMetrics:
    def __init__(self, model_name: str, state: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(model_name, state))
        labels = dict(labelnames=["model_name"], registry=self.registry)

        def counter(name, doc, **extra):
            return Counter(name, doc, **{**labels, **extra})

        def histogram(name, doc, buckets):
            return Histogram(name, doc, buckets=buckets, **labels).labels(model_name)

        self.prompt_tokens = counter("xllm:prompt_tokens", "Prompt tokens of requests that started generating.").labels(model_name)
        self.generation_tokens = counter("xllm:generation_tokens", "Generated tokens.").labels(model_name)
        self._finished = counter(
            "xllm:request_success", "Finished requests, by finish reason.", labelnames=["model_name", "finished_reason"]
        )
        self.model_name = model_name
        self.ttft = histogram("xllm:time_to_first_token_seconds", "Time from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.tpot = histogram(
            "xllm:time_per_output_token_seconds",
            "Per request: (end-to-end latency - time to first token) / (generated tokens - 1).",
            _LATENCY_BUCKETS,
        )
        self.itl = histogram("xllm:inter_token_latency_seconds", "Time between consecutive outputs of a request.", _LATENCY_BUCKETS)
        self.e2e = histogram("xllm:e2e_request_latency_seconds", "Time from arrival to the last token.", _REQUEST_BUCKETS)
        self.queue = histogram("xllm:request_queue_time_seconds", "Time from arrival to the first scheduled step.", _REQUEST_BUCKETS)

    def finished(self, reason: str | None) -> None:
        self._finished.labels(self.model_name, reason or "unknown").inc()
