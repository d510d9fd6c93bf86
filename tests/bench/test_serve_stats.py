"""`xllm bench serve` without a server: percentiles, per-request metrics, goodput, the rate search,
the datasets and the arrival times, against hand-computed values."""

import math

import numpy as np
import pytest

from xllm.bench.serve import ServeBenchConfig
from xllm.bench.serve_stats import (
    SLO,
    RequestRecord,
    arrival_offsets,
    distribution_ms,
    percentile,
    search_max_rate,
    summarize_run,
)
from xllm.bench.serve_workload import (
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    PromptText,
    Workload,
    random_lengths,
    sharegpt_lengths,
)


def record(send, chunks, end, tokens, index=0, error=None, prompt_tokens=10) -> RequestRecord:
    """A request sent at `send` whose text chunks arrived at `chunks`, ended at `end` (seconds)."""
    return RequestRecord(
        index=index, input_len=8, output_len=tokens, send_s=send, end_s=end, chunk_s=list(chunks),
        output_tokens=tokens, prompt_tokens=prompt_tokens, status=200 if error is None else 400, error=error,
    )


# Percentiles interpolate linearly between closest ranks (numpy's default): rank = q/100 * (n - 1).


def test_percentile_by_hand():
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4, ranks 0..3
    assert percentile(values, 50) == pytest.approx(2.5)  # rank 1.5: halfway between 2 and 3
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(values, 99) == pytest.approx(3.97)  # rank 2.97
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_percentile_matches_numpy_default():
    values = np.random.default_rng(1).exponential(size=37).tolist()
    for q in (1, 25, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_distribution_is_in_milliseconds():
    d = distribution_ms([0.001, 0.002, 0.003])
    assert d["mean"] == pytest.approx(2.0) and d["median"] == pytest.approx(2.0)
    assert d["p90"] == pytest.approx(2.8) and d["p99"] == pytest.approx(2.98)
    assert distribution_ms([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_request_metrics():
    r = record(send=1.0, chunks=[1.1, 1.15, 1.25, 1.4], end=1.45, tokens=4)
    assert r.success
    assert r.ttft_s == pytest.approx(0.1)
    assert r.e2e_s == pytest.approx(0.45)
    assert r.tpot_s == pytest.approx((0.45 - 0.1) / 3)  # (e2e - ttft) / (tokens - 1)
    assert r.itl_s == pytest.approx([0.05, 0.1, 0.15])
    assert record(0.0, [0.2], 0.2, tokens=1).tpot_s is None  # one token: no TPOT
    failed = record(0.0, [], 0.01, tokens=0, error="HTTP 400: bad")
    assert not failed.success and failed.ttft_s is None and failed.tpot_s is None


def crafted_run() -> list[RequestRecord]:
    """Three successful requests and a failed one, over a 2 s run."""
    return [
        # ttft 100 ms, tpot (500-100)/4 = 100 ms, itl 100 x4
        record(0.0, [0.1, 0.2, 0.3, 0.4, 0.5], 0.5, tokens=5, index=0),
        # ttft 300 ms, tpot (700-300)/4 = 100 ms, itl 100 x4
        record(0.5, [0.8, 0.9, 1.0, 1.1, 1.2], 1.2, tokens=5, index=1),
        # ttft 100 ms, tpot (1000-100)/3 = 300 ms, itl 300 x3
        record(1.0, [1.1, 1.4, 1.7, 2.0], 2.0, tokens=4, index=2, prompt_tokens=None),
        record(1.5, [], 1.51, tokens=0, index=3, error="HTTP 400: bad request"),
    ]


def test_summary_by_hand():
    s = summarize_run(crafted_run(), duration_s=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["output_tokens"] == 14
    assert s["input_tokens"] == 10 + 10 + 8  # usage where sent, else the length asked for
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(7.0)
    assert s["total_token_throughput"] == pytest.approx(21.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(500 / 3)
    assert s["ttft_ms"]["median"] == pytest.approx(100)
    assert s["tpot_ms"]["median"] == pytest.approx(100)
    assert s["tpot_ms"]["p99"] == pytest.approx(100 + 0.98 * 200)  # rank 1.98 of 100, 100, 300
    itl = s["itl_ms"]  # 8 gaps of 100 ms, 3 of 300 ms
    assert itl["mean"] == pytest.approx((8 * 100 + 3 * 300) / 11)
    assert itl["median"] == pytest.approx(100)
    assert s["e2e_ms"]["median"] == pytest.approx(700)
    assert s["goodput"] is None and s["meets_slo"] is None  # no SLO given


def test_goodput_by_hand():
    # Request 0 meets both bounds; 1 misses TTFT (300 ms); 2 misses TPOT (300 ms); 3 failed.
    s = summarize_run(crafted_run(), duration_s=2.0, slo=SLO(ttft_ms=200, tpot_ms=150))
    assert s["slo_attained_fraction"] == pytest.approx(1 / 4)
    assert s["goodput"] == pytest.approx(1 / 2.0)
    assert s["meets_slo"] is False
    s = summarize_run(crafted_run(), duration_s=2.0, slo=SLO(ttft_ms=400, tpot_ms=400))
    assert s["goodput"] == pytest.approx(3 / 2.0)  # every successful request is good ...
    assert s["meets_slo"] is False  # ... but a failed request fails the run


def test_slo_rule_uses_p99():
    ok = crafted_run()[:3]  # ttft 100, 300, 100 ms: p99 = 100 + 0.98 * 200 = 296 ms
    assert summarize_run(ok, 2.0, SLO(ttft_ms=300))["meets_slo"] is True
    assert summarize_run(ok, 2.0, SLO(ttft_ms=295))["meets_slo"] is False
    # p99 TPOT 296 ms: the TPOT bound decides alone when the TTFT bound is loose.
    assert summarize_run(ok, 2.0, SLO(ttft_ms=1000, tpot_ms=296.5))["meets_slo"] is True
    assert summarize_run(ok, 2.0, SLO(ttft_ms=1000, tpot_ms=290))["meets_slo"] is False
    assert summarize_run(ok, 2.0, SLO(e2e_ms=900))["meets_slo"] is False  # p99 E2E ~996 ms
    assert not SLO().active and SLO(tpot_ms=1).active


def threshold(limit: float, calls: list[float]):
    """A fake evaluator: passes every rate up to `limit`, noting each rate asked."""

    def evaluate(rate: float) -> bool:
        calls.append(rate)
        return rate <= limit

    return evaluate


def test_rate_search_finds_the_threshold():
    calls: list[float] = []
    search = search_max_rate(threshold(5.3, calls), start_rate=1.0, max_rate=256.0, bisect_steps=5)
    # Doubling 1, 2, 4 pass, 8 fails; bisecting [4, 8] five times leaves an interval of 4 / 32.
    assert calls[:4] == [1.0, 2.0, 4.0, 8.0] and len(calls) == 4 + 5
    assert 5.3 - 4 / 32 <= search.best_rate <= 5.3
    assert not search.capped
    assert search.evaluations == [(r, r <= 5.3) for r in calls]


def test_rate_search_when_every_rate_fails():
    calls: list[float] = []
    search = search_max_rate(threshold(0.0, calls), start_rate=2.0, max_rate=64.0, bisect_steps=3)
    assert search.best_rate is None and not search.capped
    assert calls == [2.0, 1.0, 0.5, 0.25]  # the start failed: bisect between 0 and it


def test_rate_search_below_the_start_rate():
    search = search_max_rate(threshold(0.7, []), start_rate=2.0, max_rate=64.0, bisect_steps=6)
    assert 0.7 - 2.0 / 64 <= search.best_rate <= 0.7


def test_rate_search_capped_at_the_max_rate():
    calls: list[float] = []
    search = search_max_rate(threshold(math.inf, calls), start_rate=3.0, max_rate=20.0, bisect_steps=4)
    assert calls == [3.0, 6.0, 12.0, 20.0]  # the last doubling is clipped to the max
    assert search.best_rate == 20.0 and search.capped


def test_rate_search_rejects_bad_bounds():
    with pytest.raises(ValueError):
        search_max_rate(threshold(1, []), start_rate=0.0, max_rate=8.0, bisect_steps=1)


def test_poisson_arrivals():
    offsets = arrival_offsets(20001, 4.0, np.random.default_rng(0))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 4.0, rel=0.05)  # exponential: std = mean
    assert offsets == arrival_offsets(20001, 4.0, np.random.default_rng(0))
    assert arrival_offsets(3, math.inf, np.random.default_rng(0)) == [0.0, 0.0, 0.0]


def test_random_lengths_in_bounds():
    lengths = random_lengths(np.random.default_rng(0), 2000, input_len=100, output_len=20, range_ratio=0.25)
    inputs, outputs = zip(*lengths)
    assert min(inputs) == 75 and max(inputs) == 125
    assert min(outputs) == 15 and max(outputs) == 25
    assert set(random_lengths(np.random.default_rng(0), 5, 100, 20, 0.0)) == {(100, 20)}


def test_sharegpt_lengths_follow_the_documented_mix():
    inputs, outputs = map(np.array, zip(*sharegpt_lengths(np.random.default_rng(0), 20000)))
    assert inputs.min() >= SHAREGPT_INPUT["low"] and inputs.max() == SHAREGPT_INPUT["high"]
    assert outputs.min() >= SHAREGPT_OUTPUT["low"] and outputs.max() == SHAREGPT_OUTPUT["high"]
    assert np.median(inputs) == pytest.approx(200, rel=0.05)
    assert np.median(outputs) == pytest.approx(150, rel=0.05)
    assert inputs.mean() > 1.3 * np.median(inputs)  # a heavy right tail


def test_prompt_text_lengths_are_words():
    text = PromptText().make(np.random.default_rng(0), 50)
    assert len(text.split()) == 50


@pytest.mark.parametrize("dataset", ["random", "sharegpt", "shared-prefix"])
def test_datasets_are_seeded(dataset):
    cfg = ServeBenchConfig(dataset=dataset, num_prompts=20, input_len=40, output_len=10, range_ratio=0.5,
                           prefix_len=30, suffix_len=5)
    first = Workload(cfg).requests(0)
    assert first == Workload(cfg).requests(0)  # same seed, same point: same requests
    assert first != Workload(cfg).requests(1)  # another load point: other prompts
    assert first != Workload(ServeBenchConfig(**{**cfg.__dict__, "seed": 1})).requests(0)
    assert Workload(cfg).warmup_requests() != first[: cfg.warmup]
    assert len(first) == 20
    for r in first:
        assert len(f"{r.prefix} {r.text}".split()) == r.input_len  # one word per token aimed at
        assert r.output_len >= 1


def test_shared_prefix_is_shared_and_questions_distinct():
    cfg = ServeBenchConfig(dataset="shared-prefix", num_prompts=300, prefix_len=64, suffix_len=2, output_len=7)
    requests = Workload(cfg).requests(0)
    assert len({r.prefix for r in requests}) == 1 and len(requests[0].prefix.split()) == 64
    assert len({r.text for r in requests}) == 300  # the index leads each question: distinct
    assert all(len(r.text.split()) == 2 and r.input_len == 66 and r.output_len == 7 for r in requests)


def test_tokenizer_makes_exact_lengths(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "a", "the", "of", "and", "water", "people"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    text = PromptText(str(path))
    assert set(text.words) == {"the", "of", "and", "water", "people"}  # the words it holds as one token
    prompt = text.make(np.random.default_rng(0), 17)
    assert text.count(prompt) == 17
