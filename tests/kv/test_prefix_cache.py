"""Prefix caching: block hashes, the pool's index and LRU, the manager, and the scheduler over them."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from worker_mirror import Mirror

from xllm.config import SchedulerConfig
from xllm.kv.block_hash import ROOT, extend_hashes, hash_block, salt_key
from xllm.kv.block_pool import BlockPool
from xllm.kv.manager import KVCacheManager
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import RunnerOutput
from xllm.scheduler.request import Request
from xllm.scheduler.scheduler import Scheduler


# ---- hashes -------------------------------------------------------------------------------------
def test_hashes_chain_and_are_stable_across_processes():
    a = hash_block(ROOT, [1, 2, 3, 4])
    assert a == hash_block(ROOT, [1, 2, 3, 4]) and len(a) == 32
    assert ROOT == hashlib.sha256(b"xllm prefix cache v1").digest()  # no per-process seed
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(ROOT, [1, 2, 3, 9]), [5, 6, 7, 8])  # parent matters
    assert hash_block(ROOT, [1, 2]) != hash_block(ROOT, [1, 2], b"x")  # extra keys matter
    assert hash_block(ROOT, [256]) != hash_block(ROOT, [1, 0])  # fixed-width ids: no ambiguity


def test_salt_changes_every_block_of_the_chain():
    tokens = list(range(12))
    plain, salted, other = [], [], []
    extend_hashes(plain, tokens, 4, 3, None)
    extend_hashes(salted, tokens, 4, 3, "tenant-a")
    extend_hashes(other, tokens, 4, 3, "tenant-b")
    assert len(plain) == 3 and not set(plain) & set(salted) and not set(salted) & set(other)
    assert salt_key("") != salt_key(None)


# ---- pool ---------------------------------------------------------------------------------------
def test_freed_blocks_stay_cached_until_reused_coldest_first():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for blk, h in ((a, b"A"), (b, b"B"), (c, b"C")):
        pool.cache_block(blk, h)
    pool.free([b])
    pool.free([a])
    pool.free([c])  # free order b, a, c: b is the coldest
    assert pool.num_free == 3 and pool.lookup([b"A"]) == [a]
    (x,) = pool.allocate(1)
    assert x == b and pool.lookup([b"B"]) == [] and pool.num_evictions == 1
    pool.touch([a])  # a cache hit on a free block takes it out of the free list
    assert pool.ref_counts[a] == 1 and pool.num_free == 1
    (y,) = pool.allocate(1)
    assert y == c
    pool.check_invariants()


def test_lookup_stops_at_the_first_miss_and_duplicates_stay_unindexed():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.cache_block(a, b"1")
    pool.cache_block(c, b"3")
    assert pool.lookup([b"1", b"2", b"3"]) == [a]
    pool.cache_block(d, b"1")  # same content computed twice: the first block stays the indexed one
    assert pool.lookup([b"1"]) == [a] and pool.block_hash[d] is None
    pool.check_invariants()


def test_caching_off_indexes_nothing():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, b"A")
    assert pool.lookup([b"A"]) == []


# ---- manager ------------------------------------------------------------------------------------
def test_manager_reuses_full_computed_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert kv.allocate_slots("a", 10)
    kv.cache_computed("a", prompt, 10)
    assert kv.num_cached_blocks("a") == 2
    hits = kv.find_cached_prefix("b", prompt).blocks
    assert hits == kv.block_ids("a")[:2]
    assert kv.allocate_slots("b", 11, hits)
    assert kv.block_ids("b")[:2] == hits and kv.pool.ref_counts[hits[0]] == 2
    # A prompt of exactly two full blocks may reuse only the first: its last token is computed.
    assert kv.find_cached_prefix("c", prompt[:8]).blocks == hits[:1]
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 10 and kv.find_cached_prefix("d", prompt).blocks == hits
    kv.check_invariants()


def test_refused_allocation_with_hits_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.allocate_slots("a", 4)
    kv.cache_computed("a", [1, 2, 3, 4], 4)
    kv.free("a")  # both blocks free but cached
    kv.allocate_slots("x", 4)  # takes the two other free blocks
    hits = kv.find_cached_prefix("b", [1, 2, 3, 4, 5]).blocks
    assert len(hits) == 2
    # b needs 2 hits + 2 fresh blocks, and taking the hits leaves 0 free: refused.
    assert not kv.allocate_slots("b", 8, hits)
    assert kv.block_ids("b") == [] and kv.num_free_blocks == 2 and kv.pool.ref_counts[hits[0]] == 0
    kv.free("x")
    assert kv.allocate_slots("b", 8, hits) and kv.block_ids("b")[:2] == hits
    kv.check_invariants()


def test_only_computed_blocks_are_cached():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    kv.allocate_slots("a", 8)
    kv.cache_computed("a", list(range(8)), 5)  # second block allocated but not computed
    assert kv.num_cached_blocks("a") == 1
    assert len(kv.find_cached_prefix("b", list(range(9))).blocks) == 1


# ---- scheduler ----------------------------------------------------------------------------------
def make_scheduler(num_blocks=40, block_size=4, budget=64, caching=True, max_seqs=8) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, caching))


def request(rid, prompt, max_tokens=4, salt=None, **params):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), frozenset(), max_tokens, cache_salt=salt)


def run(sched, token=7):
    out = sched.schedule()
    sched.update(out, RunnerOutput({s.request_id: token for s in out.scheduled if s.sample}))
    return {s.request_id: (s.start_pos, s.num_tokens) for s in out.scheduled}


@pytest.mark.parametrize("caching", [True, False])
def test_second_request_computes_only_its_new_suffix(caching):
    sched = make_scheduler(caching=caching)
    shared = list(range(100, 116))  # 4 full blocks
    sched.add(request("a", shared + [1, 2], max_tokens=1))
    run(sched)
    sched.add(request("b", shared + [3, 4, 5], max_tokens=1))
    got = run(sched)
    assert got["b"] == ((16, 3) if caching else (0, 19))
    assert sched.kv.prefix_cache_queries == 18 + 19
    assert sched.kv.prefix_cache_hits == (16 if caching else 0)


def test_salts_isolate_and_prompt_logprobs_skip_the_cache():
    sched = make_scheduler()
    shared = list(range(100, 116))
    sched.add(request("a", shared + [1], salt="t1"))
    run(sched)
    sched.add(request("b", shared + [1], salt="t2"))
    sched.add(request("c", shared + [1], salt="t1", prompt_logprobs=1))
    sched.add(request("d", shared + [1], salt="t1"))
    got = run(sched)
    assert got["b"] == (0, 17) and got["c"] == (0, 17) and got["d"] == (16, 1)
    assert sched.requests["d"].num_cached_tokens == 16


def test_preempted_request_finds_its_own_blocks_again():
    sched = make_scheduler(num_blocks=7, block_size=4, budget=64)
    sched.add(request("a", range(100, 112), max_tokens=8))  # 3 blocks, grows to 5
    sched.add(request("b", range(200, 208), max_tokens=16))  # 2 blocks, grows to 6
    readmitted = []
    for _ in range(40):
        if not sched.has_unfinished():
            break
        preempted = {r.request_id for r in sched.waiting if r.num_preemptions}
        out = sched.schedule()
        readmitted += [s.start_pos for s in out.scheduled if s.request_id in preempted]
        sched.update(out, RunnerOutput({s.request_id: 7 for s in out.scheduled if s.sample}))
        sched.kv.check_invariants()
    assert sched.num_preemptions >= 1 and readmitted
    assert all(start >= 8 for start in readmitted)  # its prompt blocks came back from the cache
    assert not sched.has_unfinished() and sched.kv.num_free_blocks == 7


# ---- randomized: thousands of requests with aborts and preemptions ---------------------------------
BASES = [list(range(1000, 1040)), list(range(2000, 2040)), [5] * 40]


@st.composite
def workloads(draw):
    ops = []
    for _ in range(draw(st.integers(20, 120))):
        kind = draw(st.sampled_from(["add", "add", "step", "step", "step", "abort"]))
        if kind == "add":
            base = draw(st.integers(0, len(BASES) - 1))
            keep = draw(st.integers(0, 40))
            suffix = draw(st.lists(st.integers(1, 3), min_size=1, max_size=12))
            ops.append(("add", base, keep, suffix, draw(st.integers(1, 12)), draw(st.sampled_from([None, None, "s"]))))
        elif kind == "abort":
            ops.append(("abort", draw(st.integers(0, 1000))))
        else:
            ops.append(("step",))
    return ops


class ContentCheckingRunner:
    """Stands in for the model: writes, for every computed position, what its KV would depend on
    (the salt's tenant and all tokens up to it) and checks that every position a step reads below
    its start holds exactly that. A wrong cache hit would read someone else's content."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.slots: dict[int, tuple] = {}
        self.worker = Mirror()  # the blocks as a rank knows them: from the deltas it is sent

    def execute(self, out) -> RunnerOutput:
        bs = self.sched.kv.block_size
        result = RunnerOutput()
        for item, run in zip(out.scheduled, self.worker.items(out)):
            req = self.sched.requests[item.request_id]
            tokens = req.all_token_ids
            assert run.block_ids == self.sched.kv.block_ids(item.request_id)  # the deltas add up
            assert run.token_ids == tokens[item.start_pos : item.start_pos + item.num_tokens]
            for p in range(item.start_pos + item.num_tokens):
                slot = run.block_ids[p // bs] * bs + p % bs
                expected = (req.cache_salt, tuple(tokens[: p + 1]))
                if p < item.start_pos:
                    assert self.slots.get(slot) == expected, f"{item.request_id} reads wrong KV at position {p}"
                else:
                    self.slots[slot] = expected
            if item.sample:
                result.sampled_token_ids[item.request_id] = 1 + len(tokens) % 3
        return self.worker.record(result)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.sampled_from([4, 8]), st.sampled_from([12, 24, 64]))
def test_random_workload_keeps_counts_consistent_and_leaks_nothing(ops, block_size, num_blocks):
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=48, max_seqs=6)
    runner = ContentCheckingRunner(sched)
    ids = []
    for op in ops:
        if op[0] == "add":
            _, base, keep, suffix, max_tokens, salt = op
            prompt = (BASES[base][:keep] + suffix)[: num_blocks * block_size // 2]
            rid = f"r{len(ids)}"
            ids.append(rid)
            sched.add(request(rid, prompt, max_tokens=max_tokens, salt=salt))
        elif op[0] == "abort" and ids:
            sched.abort(ids[op[1] % len(ids)])
        else:
            out = sched.schedule()
            sched.update(out, runner.execute(out))
        sched.kv.check_invariants()
    for _ in range(400):  # drain
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        sched.update(out, runner.execute(out))
        sched.kv.check_invariants()
    assert not sched.has_unfinished()
    event("preempted" if sched.num_preemptions else "no preemption")
    event("cache hits" if sched.kv.prefix_cache_hits else "no cache hit")
    event("evictions" if sched.kv.pool.num_evictions else "no eviction")
    assert sched.kv.num_free_blocks == num_blocks and not any(sched.kv.pool.ref_counts)
    assert not sched.kv._blocks and not sched.kv._hashes
