"""Scheduling step N+1 before step N is recorded (the engine's pipelined loop): placeholders for
tokens in flight, the max_tokens cap, preemption of a request whose step is still computing, and
prefix-cache filing by what a step computed."""

from __future__ import annotations

from worker_mirror import Mirror

from xllm.config import SchedulerConfig
from xllm.kv.manager import KVCacheManager
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import RunnerOutput
from xllm.scheduler.request import Request, RequestStatus
from xllm.scheduler.scheduler import Scheduler


def make_request(rid: str, prompt_len: int, max_tokens: int = 100, first: int = 1) -> Request:
    return Request(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens), frozenset(), max_tokens)


def make_scheduler(budget=64, num_blocks=100, block_size=4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8), KVCacheManager(num_blocks, block_size))


def tokens(out, token: int) -> RunnerOutput:
    return RunnerOutput({s.request_id: token for s in out.scheduled if s.sample})


def test_next_step_decodes_a_placeholder_for_the_token_in_flight():
    s = make_scheduler()
    s.add(make_request("a", 10))
    worker = Mirror()  # what a rank makes of the steps it is sent
    s1 = s.schedule()
    assert s1.scheduled[0].new is not None and s1.scheduled[0].new.prompt_token_ids == list(range(1, 11))
    worker.items(s1)
    s2 = s.schedule()  # before s1 is recorded
    (item,) = s2.scheduled
    assert item.new is None and item.new_block_ids == [] and item.block_offset == 3  # 11 tokens: 3 blocks, sent
    (run,) = worker.items(s2)  # laid out while s1 computes: its input is the token s1 samples
    assert run.fill_last and item.sample and item.start_pos == 10 and run.token_ids == [0]
    a = s.requests["a"]
    assert a.num_computed_tokens == 11 and a.num_placeholders == 2
    assert [r.request_id for r in s.update(s1, worker.record(tokens(s1, 5)))] == ["a"]
    assert a.output_token_ids == [5] and a.num_placeholders == 1
    assert worker.states.fill("a", 10) == 5  # what fills s2's placeholder
    s3 = s.schedule()
    assert s3.scheduled[0].start_pos == 11 and worker.items(s3)[0].fill_last
    s.update(s2, worker.record(tokens(s2, 6)))
    s.update(s3, worker.record(tokens(s3, 7)))
    assert a.output_token_ids == [5, 6, 7] and a.num_placeholders == 0 and a.num_computed_tokens == 12
    s4 = s.schedule()  # nothing in flight: an ordinary decode of the last token
    (run,) = worker.items(s4)
    assert not run.fill_last and run.token_ids == [7] and s4.scheduled[0].start_pos == 12
    assert s4.scheduled[0].block_offset == 3 and s4.scheduled[0].new_block_ids == [a_blocks := s.kv.block_ids("a")[3]]
    assert run.block_ids == s.kv.block_ids("a") and a_blocks


def test_no_step_is_scheduled_past_max_tokens():
    s = make_scheduler()
    s.add(make_request("a", 6, max_tokens=2))
    s1 = s.schedule()
    s2 = s.schedule()  # samples token 2 of 2
    s.update(s1, tokens(s1, 5))
    s3 = s.schedule()  # token 2 is in flight: a is done, whatever it samples
    assert s3.is_empty
    changed = s.update(s2, tokens(s2, 6))
    assert changed[0].finish_reason == "length" and changed[0].output_token_ids == [5, 6]
    assert not s.has_unfinished() and s.kv.num_free_blocks == 100


def test_a_request_preempted_while_its_step_computes_keeps_that_token():
    s = make_scheduler(num_blocks=6, block_size=4)  # 24 token slots
    s.add(make_request("a", 8))
    s.add(make_request("b", 12, first=100))
    s1 = s.schedule()  # a: 8 (2 blocks), b: 12 (3 blocks) + 1 free block
    assert {i.request_id for i in s1.scheduled} == {"a", "b"}
    s2 = s.schedule()  # a's token 9 takes the last block; b's token 13 needs one more: b is preempted
    b = s.requests["b"]
    assert [i.request_id for i in s2.scheduled] == ["a"] and s2.preempted_ids == ["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_placeholders == 0
    s.update(s1, tokens(s1, 5))  # the step that was computing when b was preempted
    assert b.output_token_ids == [5] and b.tokens_to_compute() == 13
    s.update(s2, tokens(s2, 6))
    assert s.requests["a"].output_token_ids == [5, 6]
    s.kv.check_invariants()


def test_prefix_cache_files_what_the_recorded_step_computed():
    s = make_scheduler(budget=6, block_size=4)
    s.add(make_request("a", 10))
    s1 = s.schedule()  # 6 prompt tokens: one full block
    s2 = s.schedule()  # the other 4: blocks 2 and 3 (3 partly)
    assert s.requests["a"].num_computed_tokens == 10
    s.update(s1, tokens(s1, 5))
    assert s.kv.num_cached_blocks("a") == 1  # not the block s2 is still computing
    s.update(s2, tokens(s2, 5))
    assert s.kv.num_cached_blocks("a") == 2


def test_a_request_arriving_after_the_step_ahead_joins_it():
    s = make_scheduler(budget=16)
    s.add(make_request("a", 10))
    s1 = s.schedule()
    s2 = s.schedule()  # a's decode, scheduled while s1 computes
    s.add(make_request("b", 20, first=50))  # arrives between the steps
    assert s.admit_more(s2)
    assert [(i.request_id, i.num_tokens) for i in s2.scheduled] == [("a", 1), ("b", 15)]  # the budget left
    s.update(s1, tokens(s1, 5))
    s.update(s2, tokens(s2, 6))
    assert s.requests["b"].num_computed_tokens == 15 and s.requests["a"].output_token_ids == [5, 6]
    assert not s.admit_more(s2)  # nothing left waiting


def test_no_late_admission_under_prefill_first():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, scheduling_policy="prefill-first"),
                  KVCacheManager(100, 4))
    s.add(make_request("a", 10))
    s.schedule()
    s2 = s.schedule()
    s.add(make_request("b", 5, first=50))
    assert not s.admit_more(s2) and [i.request_id for i in s2.scheduled] == ["a"]
