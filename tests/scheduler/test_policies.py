"""Batch policies, chunk size, priorities with aging, priority preemption and timeouts."""

from __future__ import annotations

import time

import pytest

from xllm.config import SchedulerConfig
from xllm.kv.manager import KVCacheManager
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import RunnerOutput
from xllm.scheduler.request import Request
from xllm.scheduler.scheduler import Scheduler

_arrival = iter(range(10**6))


def req(rid: str, prompt_len: int, max_tokens: int = 50, priority: int = 0, first: int = 1) -> Request:
    r = Request(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens), frozenset(), max_tokens,
                priority=priority)
    r.arrival_time = float(next(_arrival))  # strictly increasing, independent of the clock
    return r


def sched(policy="chunked", budget=64, blocks=200, block_size=4, max_seqs=8, **kw) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, scheduling_policy=policy, **kw)
    return Scheduler(cfg, KVCacheManager(blocks, block_size, enable_caching=False))


def step(s: Scheduler) -> dict[str, int]:
    out = s.schedule()
    s.update(out, RunnerOutput({x.request_id: 7 for x in out.scheduled if x.sample}))
    return {x.request_id: x.num_tokens for x in out.scheduled}


def test_config_is_validated():
    with pytest.raises(ValueError, match="scheduling_policy"):
        SchedulerConfig(scheduling_policy="fastest")
    with pytest.raises(ValueError, match="max_prefill_chunk"):
        SchedulerConfig(max_prefill_chunk=0)


def test_chunk_size_caps_each_prompt_per_step():
    s = sched(budget=64, max_prefill_chunk=6)
    s.add(req("a", 20))
    s.add(req("b", 5))
    assert step(s) == {"a": 6, "b": 5}
    assert step(s) == {"a": 6, "b": 1}
    assert step(s) == {"a": 6, "b": 1}
    assert step(s) == {"a": 2, "b": 1}


def test_chunked_mixes_decodes_and_a_new_prompt():
    s = sched("chunked", budget=16)
    s.add(req("d", 4))
    step(s)
    s.add(req("p", 30))
    assert step(s) == {"d": 1, "p": 15}


def test_prefill_first_runs_new_prompts_whole_ahead_of_decodes():
    s = sched("prefill-first", budget=32)
    s.add(req("d", 4))
    step(s)  # d's prompt; it now decodes
    s.add(req("p1", 20))
    s.add(req("p2", 20))
    assert step(s) == {"p1": 20}  # a prompt step: no decode; p2 does not fit whole in what is left
    assert step(s) == {"p2": 20}
    assert step(s) == {"d": 1, "p1": 1, "p2": 1}  # nothing waiting: decodes
    s.add(req("long", 70))  # longer than the whole budget: split, alone
    assert step(s) == {"long": 32}
    assert step(s) == {"long": 32}
    assert step(s) == {"long": 6}


def test_decode_first_admits_when_few_run_or_after_a_bounded_wait():
    s = sched("decode-first", budget=64, decode_first_min_running=2, decode_first_max_wait_steps=3)
    s.add(req("a", 4))
    s.add(req("b", 4))
    assert step(s) == {"a": 4, "b": 4}  # nothing running yet: admitted
    s.add(req("c", 10))
    seen = [step(s) for _ in range(4)]
    assert seen[:2] == [{"a": 1, "b": 1}] * 2  # decode-only while 2 run
    assert "c" in seen[2] and seen[2]["c"] == 10  # c waited 3 steps: admitted with the decodes
    t = sched("decode-first", decode_first_min_running=2, decode_first_max_wait_steps=100)
    t.add(req("a", 4, max_tokens=2))
    t.add(req("b", 4))
    step(t)
    t.add(req("c", 10))
    assert step(t) == {"a": 1, "b": 1}  # a finishes (2 tokens): one runs
    assert step(t) == {"b": 1, "c": 10}  # fewer than 2 running: c joins


def test_waiting_requests_run_by_priority_then_arrival():
    s = sched(budget=8, max_seqs=2)
    for rid, prio in (("low", 2), ("mid1", 1), ("high", 0), ("mid2", 1)):
        s.add(req(rid, 4, priority=prio))
    assert step(s) == {"high": 4, "mid1": 4}
    assert s.waiting[0].request_id in ("low", "mid2")
    order = [r.request_id for r in s._queue()]
    assert order == ["mid2", "low"]


def test_high_priority_request_preempts_low_priority_running_ones():
    s = sched(budget=64, blocks=6, block_size=4)
    s.add(req("low", 16, priority=5))  # 4 blocks
    step(s)
    s.add(req("high", 12, priority=0))  # needs 3 blocks, 2 free
    got = step(s)
    assert got == {"high": 12}
    low = s.requests["low"]
    assert low.num_preemptions == 1 and low in s.waiting and low.num_computed_tokens == 0
    s.add(req("later", 4, priority=5))  # same priority as low, arrived after it
    for _ in range(60):
        if not s.has_unfinished():
            break
        step(s)
        if s.requests.get("later") is not None and s.requests["later"].num_computed_tokens:
            assert low.num_computed_tokens or low.finished  # low kept its place ahead of later
    assert not s.has_unfinished()


def test_equal_priority_never_preempts_at_admission():
    s = sched(budget=64, blocks=6, block_size=4)
    s.add(req("first", 16))
    step(s)
    s.add(req("second", 12))
    assert step(s) == {"first": 1}  # second waits for blocks
    assert s.requests["first"].num_preemptions == 0


def test_no_starvation_under_a_stream_of_higher_priority_work():
    s = sched(budget=16, max_seqs=1, priority_aging_steps=8)
    s.add(req("patient", 4, max_tokens=1, priority=3))
    ran_at = None
    for t in range(200):
        s.add(req(f"hi{t}", 4, max_tokens=1, priority=0, first=100 + t))
        got = step(s)
        if "patient" in got:
            ran_at = t
            break
    assert ran_at is not None and ran_at <= 3 * 8 + 4


def test_timeout_ends_waiting_and_running_requests_and_frees_blocks():
    s = sched(budget=64, blocks=20, max_seqs=1)
    running, waiting = req("running", 8), req("waiting", 8)
    s.add(running)
    s.add(waiting)
    step(s)
    assert running.num_computed_tokens == 8 and s.kv.num_free_blocks < 20
    running.deadline = waiting.deadline = time.monotonic() - 1
    out = s.schedule()
    assert not out.scheduled
    changed = s.update(out, RunnerOutput())
    assert {r.request_id for r in changed} == {"running", "waiting"}
    assert all(r.finish_reason == "timeout" for r in changed)
    assert not s.has_unfinished() and s.kv.num_free_blocks == 20
