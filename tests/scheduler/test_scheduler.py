from xllm.config import SchedulerConfig
from xllm.kv.manager import KVCacheManager
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import RunnerOutput
from xllm.scheduler.request import Request, RequestStatus
from xllm.scheduler.scheduler import Scheduler


def make_request(rid: str, prompt_len: int, max_tokens: int = 100, stop=frozenset()) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), stop, max_tokens)


def make_scheduler(budget=64, max_seqs=8, num_blocks=100, block_size=4, chunked=True) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_chunked_prefill=chunked)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size))


def step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    result = RunnerOutput({s.request_id: token for s in out.scheduled if s.sample})
    changed = sched.update(out, result)
    return out, changed


def scheduled(out) -> dict[str, int]:
    return {s.request_id: s.num_tokens for s in out.scheduled}


def test_prompt_within_budget_runs_whole_then_decodes_one_token_per_step():
    sched = make_scheduler(budget=64)
    sched.add(make_request("a", 10, max_tokens=3))
    out, changed = step(sched)
    assert scheduled(out) == {"a": 10}
    assert out.scheduled[0].sample and out.scheduled[0].start_pos == 0
    assert [r.output_token_ids for r in changed] == [[7]]
    out, _ = step(sched)
    assert scheduled(out) == {"a": 1} and out.scheduled[0].start_pos == 10
    assert out.scheduled[0].num_tokens == 1 and out.scheduled[0].new is None  # the workers know it and its token
    _, changed = step(sched)
    assert changed[0].finished and changed[0].finish_reason == "length"
    assert not sched.has_unfinished() and sched.kv.num_free_blocks == 100


def test_long_prompt_is_chunked_while_decodes_keep_running():
    sched = make_scheduler(budget=8)
    sched.add(make_request("decoder", 3))
    step(sched)  # decoder's prompt; it now decodes
    sched.add(make_request("long", 20))
    seen = []
    for _ in range(4):
        out, _ = step(sched)
        seen.append(scheduled(out))
    # The decode gets its token every step; the long prompt fills the rest of the 8-token budget.
    assert seen == [{"decoder": 1, "long": 7}, {"decoder": 1, "long": 7}, {"decoder": 1, "long": 6}, {"decoder": 1, "long": 1}]
    long = sched.requests["long"]
    assert long.output_token_ids == [7, 7]  # sampled only when its prompt was complete


def test_partial_chunk_does_not_sample():
    sched = make_scheduler(budget=5)
    sched.add(make_request("a", 12))
    out, changed = step(sched)
    assert not out.scheduled[0].sample and changed == []
    assert sched.requests["a"].num_computed_tokens == 5


def test_no_chunking_waits_for_a_step_with_room():
    sched = make_scheduler(budget=8, chunked=False)
    sched.add(make_request("a", 6))
    sched.add(make_request("b", 6))
    out, _ = step(sched)
    assert scheduled(out) == {"a": 6}


def test_running_sequences_are_bounded():
    sched = make_scheduler(budget=1000, max_seqs=3)
    for i in range(5):
        sched.add(make_request(f"r{i}", 4))
    out, _ = step(sched)
    assert set(scheduled(out)) == {"r0", "r1", "r2"}
    assert sched.num_running == 3 and sched.num_waiting == 2


def test_preemption_frees_the_newest_and_requeues_it_first():
    # 6 blocks of 4 tokens. a and b take 2 blocks each for 8-token prompts, then grow.
    sched = make_scheduler(budget=100, num_blocks=5, block_size=4)
    sched.add(make_request("a", 8))
    sched.add(make_request("b", 8))
    sched.add(make_request("c", 4))
    step(sched)  # a, b: 2 blocks each; c: 1 block -> pool full
    assert sched.kv.num_free_blocks == 0
    out, _ = step(sched)  # a needs a 3rd block: c (newest) is preempted, then b
    assert "c" in out.preempted_ids
    c = sched.requests["c"]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0 and c.num_preemptions >= 1
    assert sched.waiting[0].request_id in out.preempted_ids
    # The preempted request keeps its generated token and recomputes prompt + output later.
    assert c.output_token_ids == [7] and c.tokens_to_compute() == 5


def test_preempted_request_is_recomputed_and_finishes():
    sched = make_scheduler(budget=100, num_blocks=6, block_size=4)
    for rid in "abc":
        sched.add(make_request(rid, 7, max_tokens=6))
    finished = set()
    for _ in range(100):
        _, changed = step(sched)
        finished |= {r.request_id for r in changed if r.finished}
        if not sched.has_unfinished():
            break
    assert finished == {"a", "b", "c"}
    assert sched.num_preemptions > 0
    assert sched.kv.num_free_blocks == 6


def test_request_alone_that_outgrows_the_cache_ends_with_length():
    sched = make_scheduler(budget=100, num_blocks=2, block_size=4)
    sched.add(make_request("a", 7, max_tokens=50))
    reasons = []
    for _ in range(10):
        _, changed = step(sched)
        reasons += [r.finish_reason for r in changed if r.finished]
        if not sched.has_unfinished():
            break
    assert reasons == ["length"]
    assert len(sched.requests) == 0 and sched.kv.num_free_blocks == 2


def test_stop_token_finishes_and_frees():
    sched = make_scheduler()
    sched.add(make_request("a", 4, stop=frozenset({7})))
    _, changed = step(sched, token=7)
    assert changed[0].finish_reason == "stop"
    assert sched.kv.num_free_blocks == 100


def test_abort_frees_blocks_of_running_and_waiting():
    sched = make_scheduler(max_seqs=1)
    sched.add(make_request("a", 4))
    sched.add(make_request("b", 4))
    step(sched)
    assert sched.abort("a").finish_reason == "abort"
    assert sched.abort("b").finish_reason == "abort"
    assert sched.abort("missing") is None
    assert not sched.has_unfinished() and sched.kv.num_free_blocks == 100


def test_block_ids_cover_the_scheduled_tokens():
    sched = make_scheduler(budget=6, block_size=4)
    sched.add(make_request("a", 10))
    out, _ = step(sched)
    item = out.scheduled[0]
    assert item.block_offset == 0 and len(item.new_block_ids) * 4 >= item.start_pos + item.num_tokens
