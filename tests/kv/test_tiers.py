"""The host and disk tiers under the prefix cache: a KV connector (scheduler side, worker side, disk)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from xllm.config import SchedulerConfig
from xllm.kv.block_hash import ROOT, extend_hashes, hash_block
from xllm.kv.connector import KVConnectorOutput
from xllm.kv.manager import KVCacheManager
from xllm.kv.tiers import build_tiers
from xllm.kv.tiers import disk as disk_module
from xllm.kv.tiers.disk import DiskStore, encode_entry, read_entry
from xllm.kv.tiers.scheduler import TierScheduler
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import RunnerOutput
from xllm.scheduler.request import Request, RequestStatus
from xllm.scheduler.scheduler import Scheduler

FP = (b"F" * 16, {"test": True})


def h(i: int) -> bytes:
    return hash_block(ROOT, [i])


# ---- the disk folder and its entries ------------------------------------------------------------
def store(root, fingerprint=FP[0], payload_bytes=300, queue=1 << 20) -> DiskStore:
    return DiskStore(str(root), fingerprint, {"test": True}, payload_bytes, queue)


def read(disk: DiskStore, block_hash: bytes) -> bytes | None:
    got, done = [], threading.Event()
    disk.read(block_hash, got.append, lambda ok: done.set())
    assert done.wait(5)
    return got[0] if got else None


def test_disk_round_trip_and_a_restart_finds_its_entries(tmp_path):
    disk = store(tmp_path)
    disk.write(h(1), b"abc" * 100)
    assert read(disk, h(1)) == b"abc" * 100  # served from the write queue or the file
    disk.flush()
    folder = disk.folder
    assert os.path.dirname(folder) == str(tmp_path) and os.path.basename(folder) == FP[0].hex()
    disk.close()
    again = store(tmp_path)  # a restart: the same folder, its entries indexed
    assert again.folder == folder and again.scan() == [h(1)]
    assert read(again, h(1)) == b"abc" * 100


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "foreign", "size"])
def test_damaged_or_foreign_entry_is_a_miss_and_is_deleted(tmp_path, damage):
    disk = store(tmp_path)
    payload = bytes(range(100)) * 3
    disk.write(h(1), payload)
    disk.flush()
    path = disk.path(h(1))
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]  # a torn write
    elif damage == "garbage":
        data = bytearray(b"not a kv entry")
    elif damage == "foreign":  # whole and checksummed, but written under another fingerprint
        data = bytearray(encode_entry(b"G" * 16, payload))
    else:  # another block size or model: whole, ours, but not a block here
        data = bytearray(encode_entry(FP[0], payload + b"x"))
    with open(path, "wb") as f:
        f.write(bytes(data))
    assert read_entry(path, FP[0], len(payload)) is None
    assert read(disk, h(1)) is None
    disk.flush()
    assert disk.num_corrupt == 1 and not os.path.exists(path)


def test_leftovers_of_an_unfinished_write_are_deleted_at_start(tmp_path):
    folder = tmp_path / FP[0].hex()
    folder.mkdir()
    (folder / (h(3).hex() + ".kv.123.tmp")).write_bytes(b"half")
    disk = store(tmp_path)
    assert disk.scan() == [] and sorted(os.listdir(folder)) == [".lock", "fingerprint.json"]


def test_a_folder_of_another_fingerprint_is_never_read(tmp_path):
    first = store(tmp_path, b"A" * 16)
    first.write(h(1), b"x" * 300)
    first.close()
    other = store(tmp_path, b"B" * 16)  # another model, dtype, block size, layout or rank
    assert other.folder != first.folder and other.scan() == []
    assert read(other, h(1)) is None


def test_each_live_instance_has_its_own_folder(tmp_path):
    first, second = store(tmp_path), store(tmp_path)
    assert first.folder != second.folder  # same fingerprint, another live process: <fp>.1
    first.write(h(1), b"a" * 300)
    second.write(h(1), b"b" * 300)
    first.flush()
    second.flush()
    assert read(first, h(1)) == b"a" * 300 and read(second, h(1)) == b"b" * 300
    second.close()
    assert store(tmp_path).folder == second.folder  # a free folder is taken again


def test_a_killed_instance_leaves_its_folder_to_the_next_one(tmp_path):
    """The folder lock is an flock: the kernel drops it when its holder dies, even by SIGKILL."""
    code = (
        "import sys, time; from xllm.kv.tiers.disk import DiskStore;"
        f"d = DiskStore({str(tmp_path)!r}, b'F' * 16, {{}}, 300, 1 << 20); print(d.folder, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        held = child.stdout.readline().strip()
        assert store(tmp_path).folder != held  # taken while it lives
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert store(tmp_path).folder == held


def test_writes_past_the_queue_bound_are_reported_lost(tmp_path, monkeypatch):
    gate = threading.Event()
    disk = store(tmp_path, queue=700)
    real = disk._write
    monkeypatch.setattr(disk, "_write", lambda *args: (gate.wait(5), real(*args)))
    for i in range(4):
        disk.write(h(i), b"x" * 300)  # 300 bytes each: the third and fourth do not fit
    gate.set()
    disk.flush()
    assert disk.take_lost() == [h(2), h(3)]
    assert sorted(disk.scan()) == sorted([h(0), h(1)])


# ---- the scheduler side alone -------------------------------------------------------------------
def kinds(meta):
    return [(t.kind, t.block, t.slot) for t in meta.transfers]


def test_saves_spill_the_least_recent_host_entry_and_disk_keeps_its_bound():
    tiers = TierScheduler(2, host_tier=True, disk_entry_bytes=100, disk_limit=300)
    for b in range(6):
        tiers.on_evict(b, h(b))
        tiers.check_invariants()
    meta = tiers.take_meta()
    # host holds 2: each further save first spills the oldest host entry; disk keeps 3, oldest deleted
    assert [t.kind for t in meta.transfers] == ["save", "save", "spill", "save", "spill", "save", "spill", "save",
                                                "delete", "spill", "save"]
    assert [tiers.tier_of(h(b)) for b in range(6)] == [None, "disk", "disk", "disk", "host", "host"]
    assert tiers.disk_bytes == 300
    tiers.on_evict(9, h(4))  # already in the host tier: nothing to save
    assert not tiers.take_meta().transfers


def test_a_restart_over_a_smaller_bound_deletes_the_oldest_entries():
    """Entries found at start past the bound are deleted (not just forgotten, which would leave
    files no bound ever counts)."""
    tiers = TierScheduler(1, host_tier=True, disk_entry_bytes=100, disk_limit=200, disk_entries=[h(i) for i in range(4)])
    assert kinds(tiers.take_meta()) == [("delete", -1, -1), ("delete", -1, -1)]
    assert [tiers.tier_of(h(i)) for i in range(4)] == [None, None, "disk", "disk"]
    nothing = TierScheduler(1, host_tier=False, disk_entry_bytes=100, disk_limit=50)  # not even one entry fits
    nothing.on_evict(0, h(9))
    assert not nothing.take_meta().transfers and nothing.tier_of(h(9)) is None
    nothing.check_invariants()


def test_disk_only_spills_each_save_at_once_through_a_staging_slot():
    tiers = TierScheduler(1, host_tier=False, disk_entry_bytes=100, disk_limit=1000)
    tiers.on_evict(0, h(0))
    tiers.on_evict(1, h(1))
    assert kinds(tiers.take_meta()) == [("save", 0, 0), ("spill", -1, 0), ("save", 1, 0), ("spill", -1, 0)]
    assert tiers.tier_of(h(0)) == tiers.tier_of(h(1)) == "disk"
    tiers.check_invariants()


def test_fetch_reads_into_the_slots_it_can_take_and_keeps_its_chain():
    """`fetch` keeps the host entries of the chain it is given (the caller records the loads of the
    leading ones first and does not pass them, so their slots may be reused) and reads only into
    slots it can take."""
    tiers = TierScheduler(3, host_tier=True, disk_entry_bytes=100, disk_limit=10_000, disk_entries=[h(i) for i in range(1, 6)])
    tiers.on_evict(0, h(0))
    tiers.take_meta()
    assert tiers.available([h(i) for i in range(6)]) == 1
    assert tiers.fetch([h(i) for i in range(6)])  # pending
    meta = tiers.take_meta()
    assert [t.kind for t in meta.transfers] == ["read", "read"]  # 2 free slots; h(0)'s is kept
    assert tiers.tier_of(h(0)) == "host"
    tiers.update(KVConnectorOutput(finished_reads=[(t.block_hash, t.slot, True) for t in meta.transfers]))
    assert tiers.available([h(i) for i in range(6)]) == 3
    for i in range(3):
        tiers.load(h(i), 10 + i)  # h(0..2) are loaded first: their slots can take the reads
    assert tiers.fetch([h(i) for i in range(3, 6)])
    # after the loads: h(0), not on disk yet, is spilled before its slot takes a read
    assert [t.kind for t in tiers.take_meta().transfers] == ["load", "load", "load", "spill", "read", "read", "read"]
    tiers.check_invariants()
    small = TierScheduler(1, host_tier=True, disk_entry_bytes=100, disk_limit=10_000, disk_entries=[h(2)])
    small.on_evict(0, h(1))
    small.take_meta()
    assert not small.fetch([h(1), h(2)])  # the one slot holds the chain's h(1): nothing to read into
    assert not small.take_meta().transfers and small.tier_of(h(1)) == "host"


def test_the_slots_a_lookup_loads_from_are_pinned_until_loaded():
    """Between `available` and `load`, allocating the device blocks may evict others, whose saves
    must not take the slots about to be loaded (they would be gone: a KeyError, a lost hit)."""
    tiers = TierScheduler(2, host_tier=True)
    tiers.on_evict(0, h(1))
    tiers.on_evict(1, h(2))
    tiers.take_meta()
    assert tiers.available([h(1), h(2)]) == 2
    tiers.on_evict(5, h(9))  # an eviction while the device blocks are allocated: no slot to give
    tiers.load(h(1), 7)
    tiers.load(h(2), 8)
    assert [t.kind for t in tiers.take_meta().transfers] == ["load", "load"] and tiers.hits["host"] == 2
    tiers.on_evict(5, h(9))  # the pins end with the lookup: the LRU entry's slot is taken now
    assert tiers.tier_of(h(9)) == "host" and tiers.tier_of(h(1)) is None
    tiers.check_invariants()


def test_a_damaged_read_frees_its_slot_and_forgets_the_entry():
    tiers = TierScheduler(2, host_tier=True, disk_entry_bytes=100, disk_limit=10_000, disk_entries=[h(1)])
    assert tiers.available([h(1)]) == 0 and tiers.fetch([h(1)])
    (read_op,) = tiers.take_meta().transfers
    tiers.update(KVConnectorOutput(finished_reads=[(h(1), read_op.slot, False)]))
    assert tiers.tier_of(h(1)) is None and tiers.num_corrupt == 1 and not tiers.reads_pending
    tiers.check_invariants()


# ---- both sides over a fake model's cache -------------------------------------------------------
def caches(num_blocks=8, layers=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, num_blocks, 4, 2, 8, generator=g) for _ in range(layers)]


def block(kv, b):
    return torch.stack([c[:, b] for c in kv])


def block_bytes(kv):
    return block(kv, 0).numel() * 4


def tiered(kv, host_blocks=8, disk=None, disk_blocks=64):
    bb = block_bytes(kv)
    return build_tiers(kv, host_blocks * bb, str(disk) if disk else None, disk_blocks * (bb + 64) if disk else 0, FP)


def run(manager, worker, nothing_else_runs=False):
    """What the runner does for a step: the transfers, then the report back."""
    worker.execute(manager.take_connector_meta(nothing_else_runs))
    manager.connector_update(worker.take_output())


def cache_prompt(m, kv, rid, prompt):
    m.allocate_slots(rid, len(prompt))
    m.cache_computed(rid, prompt, len(prompt))
    return [block(kv, b).clone() for b in m.block_ids(rid)[: len(prompt) // m.block_size]]


def test_blocks_go_down_to_host_then_disk_and_come_back(tmp_path):
    kv = caches(num_blocks=4)
    tiers, worker = tiered(kv, host_blocks=2, disk=tmp_path)
    m = KVCacheManager(4, block_size=4, connector=tiers)
    prompt = list(range(100, 117))  # 4 full blocks + 1
    content = cache_prompt(m, kv, "a", prompt[:16])
    m.free("a")
    m.allocate_slots("x", 16)  # takes all 4 blocks: a's are saved below, tail first, so the tail goes on to disk
    run(m, worker)
    worker.flush()
    hashes = []
    extend_hashes(hashes, prompt, 4, 4, None)
    assert [tiers.tier_of(hh) for hh in hashes] == ["host", "host", "disk", "disk"]
    m.free("x")
    for c in kv:
        c.zero_()
    got = m.find_cached_prefix("b", prompt)
    # the host entries are loaded now; the chain goes on into disk entries: reads start, the request waits
    assert got.pending and len(got.blocks) == 2
    run(m, worker, nothing_else_runs=True)
    worker.flush()
    run(m, worker)  # the finished reads reported
    got = m.find_cached_prefix("b", prompt)
    assert not got.pending and len(got.blocks) == 4
    run(m, worker)  # the loads
    for b, want in zip(got.blocks, content):
        assert torch.equal(block(kv, b), want)
    assert tiers.hits == {"host": 2, "disk": 2}
    m.check_invariants()
    tiers.check_invariants()


def test_promotion_never_evicts_its_own_chain():
    kv = caches(num_blocks=2)
    tiers, worker = tiered(kv)
    m = KVCacheManager(2, block_size=4, connector=tiers)
    prompt = list(range(17))  # 4 full blocks + 1
    hashes = []
    extend_hashes(hashes, prompt, 4, 4, None)
    for i, hsh in enumerate(hashes):
        tiers.on_evict(i % 2, hsh)  # all four in the host tier
    run(m, worker)
    got = m.find_cached_prefix("b", prompt)
    assert len(got.blocks) == 2 and len(set(got.blocks)) == 2  # a third promotion would evict the first
    assert [m.pool.block_hash[b] for b in got.blocks] == hashes[:2]
    m.check_invariants()


def test_a_failing_promotion_leaks_no_pinned_block(monkeypatch):
    """The device part of the chain is pinned while promotions allocate; an error in the middle
    unpins it, frees and un-files what it promoted, and the lookup answers with the device part."""
    kv = caches(num_blocks=6)
    tiers, worker = tiered(kv)
    m = KVCacheManager(6, block_size=4, connector=tiers)
    prompt = list(range(100, 117))
    cache_prompt(m, kv, "a", prompt[:16])
    m.free("a")
    assert m.allocate_slots("x", 16)  # the two never-used blocks, then a's two coldest (tail) ones: saved below
    m.free("x")
    run(m, worker)
    calls = []

    def load(block_hash, b):
        calls.append(b)
        if len(calls) == 2:
            raise RuntimeError("injected: the tier failed")
        return real_load(block_hash, b)

    real_load = tiers.load
    monkeypatch.setattr(tiers, "load", load)
    got = m.find_cached_prefix("b", prompt)
    assert len(calls) == 2 and m.num_promotion_errors == 1
    assert len(got.blocks) == 2 and not got.pending  # the device hits only; the rest is recomputed
    assert m.num_free_blocks == 6 and all(m.pool.block_hash[b] is None for b in calls)
    m.check_invariants()
    assert m.allocate_slots("b", 17, got.blocks)
    m.check_invariants()


def request(rid, tokens, max_tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), frozenset(), max_tokens)


def test_a_request_waits_for_its_disk_reads_in_a_state_of_its_own_while_others_run(tmp_path, monkeypatch):
    gate = threading.Event()
    real_read = disk_module.read_entry
    monkeypatch.setattr(disk_module, "read_entry", lambda *args: (gate.wait(5), real_read(*args))[1])
    kv = caches(num_blocks=9)
    tiers, worker = tiered(kv, host_blocks=0, disk=tmp_path)  # disk only: a small staging pool
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(9, 4, connector=tiers))
    prompt = list(range(100, 113))

    def step():
        out = sched.schedule()
        worker.execute(out.kv_meta)
        result = RunnerOutput({s.request_id: 7 for s in out.scheduled if s.sample}, kv_output=worker.take_output())
        sched.update(out, result)
        return {s.request_id: (s.start_pos, s.num_tokens) for s in out.scheduled}

    sched.add(request("a", prompt, 1))
    step()  # a computed, cached, finished
    sched.add(request("big", list(range(500, 528)), 30))  # 7 blocks: evicts a's third full block to disk
    step()
    assert tiers.num_disk_entries == 1
    sched.add(request("b", prompt, 1))
    sched.add(request("c", list(range(900, 903)), 1))
    # big's decode evicts a's second block; b starts reading its chain and waits; c is admitted
    # past it (and evicts a's first block)
    assert step() == {"big": (28, 1), "c": (0, 3)}
    assert sched.requests["b"].status is RequestStatus.WAITING_FOR_KV
    gate.set()
    worker.flush()
    sched.abort("big")
    for _ in range(4):  # the reads are reported, then what c's and big's blocks evicted is read too
        got = step()
        if got:
            break
    # every full block of b's prompt came back from disk
    assert got == {"b": (12, 1)} and tiers.hits["disk"] == 3
    tiers.check_invariants()


def test_an_abandoned_read_ends_in_its_slot_and_holds_nothing(tmp_path, monkeypatch):
    gate = threading.Event()
    real_read = disk_module.read_entry
    monkeypatch.setattr(disk_module, "read_entry", lambda *args: (gate.wait(5), real_read(*args))[1])
    kv = caches(num_blocks=4)
    tiers, worker = tiered(kv, host_blocks=0, disk=tmp_path)
    m = KVCacheManager(4, block_size=4, connector=tiers)
    prompt = list(range(100, 117))
    cache_prompt(m, kv, "a", prompt[:16])
    m.free("a")
    m.allocate_slots("x", 16)
    run(m, worker)
    m.free("x")
    assert m.find_cached_prefix("b", prompt).pending
    run(m, worker)  # the reads start; "b" goes away before they finish
    assert worker.reads_in_flight > 0
    gate.set()
    worker.flush()
    run(m, worker)
    assert worker.reads_in_flight == 0 and not tiers.reads_pending
    tiers.check_invariants()  # every staging slot is free or an ordinary (evictable) host entry
    for i in range(20):  # later saves reuse those slots
        tiers.on_evict(0, h(1000 + i))
    run(m, worker)
    tiers.check_invariants()


def test_a_preempted_request_resumes_from_the_host_tier():
    """Preemption with a host tier: the victim's computed full blocks stay cached, go down to the
    host tier when another request needs the room, and come back when it is readmitted; only
    its last, partial block is recomputed."""
    kv = caches(num_blocks=5)
    tiers, worker = tiered(kv, host_blocks=16)
    m = KVCacheManager(5, block_size=4, connector=tiers)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), m)
    s.add(Request("a", list(range(1, 9)), SamplingParams(max_tokens=8), frozenset(), 8))  # grows to 4 of the 5 blocks
    s.add(Request("b", list(range(100, 109)), SamplingParams(max_tokens=3), frozenset(), 3))
    b = s.requests["b"]
    computed_at_readmission = []
    for _ in range(30):
        if not s.has_unfinished():
            break
        out = s.schedule()
        worker.execute(out.kv_meta)
        for item in out.scheduled:
            if item.request_id == "b" and b.num_preemptions and not computed_at_readmission:
                computed_at_readmission.append(item.start_pos)
        s.update(out, RunnerOutput({i.request_id: 7 for i in out.scheduled if i.sample}, kv_output=worker.take_output()))
    assert b.num_preemptions == 1 and b.status is RequestStatus.FINISHED and len(b.output_token_ids) == 3
    assert tiers.hits["host"] >= 1  # a evicted b's cached blocks: they were saved, then loaded back
    assert computed_at_readmission == [8]  # 2 full blocks back; the partial third recomputed
    m.check_invariants()
