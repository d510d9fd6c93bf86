"""The host and disk tiers under the prefix cache."""

from __future__ import annotations

import os

import pytest
import torch

from xllm.kv.block_hash import ROOT, extend_hashes, hash_block
from xllm.kv.manager import KVCacheManager
from xllm.kv.tiers import DiskTier, KVTiers


def h(i: int) -> bytes:
    return hash_block(ROOT, [i])


# ---- disk ---------------------------------------------------------------------------------------
def test_disk_round_trip_and_reopen(tmp_path):
    disk = DiskTier(str(tmp_path), 1 << 20)
    disk.put(h(1), b"abc" * 100)
    assert disk.get(h(1)) == b"abc" * 100 and disk.get(h(2)) is None
    again = DiskTier(str(tmp_path), 1 << 20)  # a restart finds the entry
    assert again.get(h(1)) == b"abc" * 100


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_entry_is_detected_deleted_and_never_used(tmp_path, damage):
    disk = DiskTier(str(tmp_path), 1 << 20)
    disk.put(h(1), bytes(range(256)) * 8)
    path = tmp_path / (h(1).hex() + ".kv")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]  # a torn write
    else:
        data = bytearray(b"not a kv entry")
    path.write_bytes(bytes(data))
    assert disk.get(h(1)) is None
    assert disk.num_corrupt == 1 and not path.exists() and h(1) not in disk


def test_unfinished_write_is_cleaned_up_at_start(tmp_path):
    (tmp_path / (h(3).hex() + ".kv.123.tmp")).write_bytes(b"half")
    disk = DiskTier(str(tmp_path), 1 << 20)
    assert len(disk) == 0 and os.listdir(tmp_path) == []


def test_disk_respects_its_bound_oldest_first(tmp_path):
    payload = b"x" * 1000
    disk = DiskTier(str(tmp_path), 5 * 1100)
    for i in range(20):
        disk.put(h(i), payload)
        assert disk.used_bytes <= 5 * 1100
        on_disk = sum(f.stat().st_size for f in tmp_path.iterdir())
        assert on_disk == disk.used_bytes
    assert [i for i in range(20) if h(i) in disk] == [15, 16, 17, 18, 19]
    assert DiskTier(str(tmp_path), 2 * 1100).used_bytes <= 2 * 1100  # a smaller bound at restart trims


# ---- host + disk over a fake model's cache ----------------------------------------------------
def caches(num_blocks=8, layers=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, num_blocks, 4, 2, 8, generator=g) for _ in range(layers)]


def block(kv, b):
    return torch.stack([c[:, b] for c in kv])


def test_demote_promote_through_host_then_disk(tmp_path):
    kv = caches()
    per_block = block(kv, 0).numel() * 4
    tiers = KVTiers(kv, host_blocks=2, disk_folder=str(tmp_path), disk_bytes=10 * (per_block + 64))
    originals = {b: block(kv, b).clone() for b in range(4)}
    for b in range(4):
        tiers.demote(b, h(b))  # host holds 2; the two oldest went to disk
    assert [tiers.tier_of(h(b)) for b in range(4)] == ["disk", "disk", "host", "host"]
    for b in range(8):
        for c in kv:
            c[:, b].zero_()
    for b in (3, 2, 1, 0):  # host entries first (a disk hit moves its entry up to the host tier)
        assert tiers.promote(h(b), b + 4)
        assert torch.equal(block(kv, b + 4), originals[b])
    assert tiers.hits == {"host": 2, "disk": 2}
    assert not tiers.promote(h(99), 0)


def test_manager_promotes_lower_tier_hits_into_free_blocks():
    kv = caches(num_blocks=6)
    tiers = KVTiers(kv, host_blocks=8)
    m = KVCacheManager(6, block_size=4, tiers=tiers)
    prompt = list(range(100, 113))  # 3 full blocks + 1
    assert m.allocate_slots("a", 13)
    m.cache_computed("a", prompt, 13)
    content = [block(kv, b).clone() for b in m.block_ids("a")[:3]]
    m.free("a")
    assert m.allocate_slots("x", 24)  # takes all 6 blocks: a's cached blocks are evicted, demoted
    assert len(tiers._host_index) == 3
    m.free("x")  # x never cached anything
    hits = m.find_cached_prefix("b", prompt)
    assert len(hits) == 3 and tiers.hits["host"] == 3
    for b, want in zip(hits, content):
        assert torch.equal(block(kv, b), want)
    assert m.allocate_slots("b", 14, hits)
    m.check_invariants()


def test_promotion_never_evicts_its_own_chain():
    kv = caches(num_blocks=2)
    tiers = KVTiers(kv, host_blocks=8)
    m = KVCacheManager(2, block_size=4, tiers=tiers)
    prompt = list(range(17))  # 4 full blocks + 1
    hashes = []
    extend_hashes(hashes, prompt, 4, 4, None)
    for i, hsh in enumerate(hashes):
        tiers.demote(i % 2, hsh)  # all four in the host tier
    hits = m.find_cached_prefix("b", prompt)
    assert len(hits) == 2 and len(set(hits)) == 2  # a third promotion would evict the first
    assert [m.pool.block_hash[b] for b in hits] == hashes[:2]
    m.check_invariants()


def test_disk_reads_run_in_the_background_and_the_request_waits(tmp_path, monkeypatch):
    import threading

    import xllm.kv.tiers as tiers_module

    gate = threading.Event()
    real_read = tiers_module.read_entry

    def slow_read(path):
        gate.wait(5)
        return real_read(path)

    monkeypatch.setattr(tiers_module, "read_entry", slow_read)
    kv = caches(num_blocks=6)
    tiers = KVTiers(kv, host_blocks=0, disk_folder=str(tmp_path), disk_bytes=1 << 24)
    m = KVCacheManager(6, block_size=4, tiers=tiers)
    prompt = list(range(100, 113))
    m.allocate_slots("a", 13)
    m.cache_computed("a", prompt, 13)
    content = [block(kv, b).clone() for b in m.block_ids("a")[:3]]
    m.free("a")
    m.allocate_slots("x", 24)  # evicts a's blocks: demoted straight to disk (no host tier)
    m.free("x")
    assert len(tiers.disk) == 3
    hits = m.find_cached_prefix("b", prompt, wait_for_loads=False)
    assert hits == [] and m.loads_pending  # reads started, nothing promoted yet
    gate.set()
    for f in list(tiers._loading.values()):
        f.result(5)
    hits = m.find_cached_prefix("b", prompt, wait_for_loads=False)
    assert len(hits) == 3 and not m.loads_pending and tiers.hits["disk"] == 3
    for b, want in zip(hits, content):
        assert torch.equal(block(kv, b), want)
    m.check_invariants()


def test_scheduler_lets_a_request_wait_for_its_disk_reads_while_others_run(tmp_path, monkeypatch):
    import threading

    import xllm.kv.tiers as tiers_module
    from xllm.config import SchedulerConfig
    from xllm.sampling_params import SamplingParams
    from xllm.scheduler.output import RunnerOutput
    from xllm.scheduler.request import Request
    from xllm.scheduler.scheduler import Scheduler

    gate = threading.Event()
    real_read = tiers_module.read_entry
    monkeypatch.setattr(tiers_module, "read_entry", lambda path: (gate.wait(5), real_read(path))[1])
    kv = caches(num_blocks=8)
    tiers = KVTiers(kv, host_blocks=0, disk_folder=str(tmp_path), disk_bytes=1 << 24)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(8, 4, tiers=tiers))
    prompt = list(range(100, 113))

    def request(rid, tokens, max_tokens):
        return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), frozenset(), max_tokens)

    def step():
        out = sched.schedule()
        sched.update(out, RunnerOutput({s.request_id: 7 for s in out.scheduled if s.sample}))
        return {s.request_id: (s.start_pos, len(s.token_ids)) for s in out.scheduled}

    sched.add(request("a", prompt, 1))
    step()  # a computed, cached, finished
    sched.add(request("big", list(range(500, 528)), 30))  # 7 blocks: evicts a's blocks to disk
    step()
    assert len(tiers.disk) == 2  # a's first block is still on the device, the other two went to disk
    sched.add(request("b", prompt, 1))
    assert step() == {"big": (28, 1)}  # b's reads are in flight: it waits, big decodes
    gate.set()
    for f in list(tiers._loading.values()):
        f.result(5)
    sched.abort("big")
    got = step()
    # big's first decode took the last free block, evicting a's first block to disk as well.
    assert got == {"b": (12, 1)} and tiers.hits["disk"] == 3


def test_promotion_skips_blocks_the_step_in_flight_writes():
    """While a step computes, a request in it may be freed (a stop, a preemption) and its blocks
    with it; the step still writes them, so promotions (the next step being scheduled) keep out."""
    kv = caches(num_blocks=4)
    tiers = KVTiers(kv, host_blocks=8)
    prompt = list(range(9))  # 2 full blocks + 1
    hashes = []
    extend_hashes(hashes, prompt, 4, 2, None)
    for i, hsh in enumerate(hashes):
        tiers.demote(i, hsh)
    m = KVCacheManager(4, block_size=4, tiers=tiers)
    m.busy_blocks = frozenset({0, 1})  # the coldest free blocks
    hits = m.find_cached_prefix("b", prompt)
    assert hits == [2, 3]
    m2 = KVCacheManager(4, block_size=4, tiers=tiers)
    m2.busy_blocks = frozenset({0, 1, 2})
    assert m2.find_cached_prefix("c", prompt) == [3]  # one block left to promote into
    m.check_invariants()
    m2.check_invariants()


def test_a_preempted_request_resumes_from_the_host_tier():
    """Preemption with a host tier: the victim's computed full blocks stay cached, go down to the
    host tier when another request needs the room, and come back when it is readmitted; only
    its last, partial block is recomputed."""
    from xllm.config import SchedulerConfig
    from xllm.sampling_params import SamplingParams
    from xllm.scheduler.output import RunnerOutput
    from xllm.scheduler.request import Request, RequestStatus
    from xllm.scheduler.scheduler import Scheduler

    kv = caches(num_blocks=5)
    m = KVCacheManager(5, block_size=4, tiers=KVTiers(kv, host_blocks=16))
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), m)
    s.add(Request("a", list(range(1, 9)), SamplingParams(max_tokens=8), frozenset(), 8))  # grows to 4 of the 5 blocks
    s.add(Request("b", list(range(100, 109)), SamplingParams(max_tokens=3), frozenset(), 3))
    b = s.requests["b"]
    computed_at_readmission = []
    for _ in range(30):
        if not s.has_unfinished():
            break
        out = s.schedule()
        for item in out.scheduled:
            if item.request_id == "b" and b.num_preemptions and not computed_at_readmission:
                computed_at_readmission.append(item.start_pos)
        s.update(out, RunnerOutput({i.request_id: 7 for i in out.scheduled if i.sample}))
    assert b.num_preemptions == 1 and b.status is RequestStatus.FINISHED and len(b.output_token_ids) == 3
    assert m.tiers.hits["host"] >= 1  # a evicted b's cached blocks: they were demoted, then promoted back
    assert computed_at_readmission == [8]  # 2 full blocks back; the partial third recomputed
    m.check_invariants()
