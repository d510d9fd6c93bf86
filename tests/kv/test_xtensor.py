"""The xtensor page pool: ranges map physical pages, share them, give them back, and the kernel's
mapping count (read from /proc/self/maps) is what the pool says, never leaked."""

import gc
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from xllm.kv.xtensor import XTensorPool, check_page_size, max_map_count, os_page_size, pool_mappings

PAGE = os_page_size()
FLOATS = PAGE // 4


def mappings() -> int:
    """Pool mappings made since the test started (other pools in the process, e.g. an engine's, excluded)."""
    return pool_mappings() - START[0]


START = [0]


@pytest.fixture
def pool():
    gc.collect()
    START[0] = pool_mappings()
    p = XTensorPool(num_pages=32, page_bytes=PAGE, range_pages=8, dtype=torch.float32, num_slots=4)
    yield p
    p.close()
    assert mappings() == 0


def fill_pages(p: XTensorPool) -> torch.Tensor:
    phys = p.physical().view(p.num_pages, FLOATS)
    for i in range(p.num_pages):
        phys[i] = i
    return phys


def test_range_reads_and_writes_the_physical_pages(pool):
    phys = fill_pages(pool)
    ranges = pool.ranges().view(pool.num_slots, pool.range_pages, FLOATS)
    slot = pool.map_pages("a", [5, 9, 2])
    assert ranges[slot, :3, 0].tolist() == [5, 9, 2]
    ranges[slot, 1] = -1.0  # a write through the range lands in physical page 9
    assert phys[9].eq(-1).all()
    pool.check_invariants()


def test_shared_prefix_page_is_mapped_into_both_ranges(pool):
    phys = fill_pages(pool)
    ranges = pool.ranges().view(pool.num_slots, pool.range_pages, FLOATS)
    a = pool.map_pages("a", [3, 4, 10])
    b = pool.map_pages("b", [3, 4, 20])
    assert a != b
    phys[4, 0] = 77.0
    assert ranges[a, 1, 0] == 77.0 and ranges[b, 1, 0] == 77.0
    assert ranges[a, 2, 0] == 10 and ranges[b, 2, 0] == 20


def test_consecutive_pages_are_one_mapping(pool):
    base = mappings()  # the physical view
    assert base == 1
    pool.map_pages("a", [6, 7, 8, 9])
    assert pool.map_calls == 1 and mappings() == base + 1
    pool.map_pages("a", [6, 7, 8, 9, 10])  # the sequence grows: one more call, the kernel merges it
    assert pool.map_calls == 2 and mappings() == base + 1
    pool.map_pages("b", [1, 3, 5])
    assert pool.map_calls == 5 and mappings() == base + 4


def test_growing_keeps_mapped_pages_and_a_change_remaps_from_there(pool):
    fill_pages(pool)
    ranges = pool.ranges().view(pool.num_slots, pool.range_pages, FLOATS)
    s = pool.map_pages("a", [1, 5])
    calls = pool.map_calls
    pool.map_pages("a", [1, 5])
    assert pool.map_calls == calls  # nothing to do
    pool.map_pages("a", [1, 7, 8])
    assert ranges[s, :3, 0].tolist() == [1, 7, 8] and pool.mapped_pages("a") == [1, 7, 8]


def test_release_unmaps_and_the_slot_is_reused(pool):
    fill_pages(pool)
    s = pool.map_pages("a", [1, 2, 4])
    pool.map_pages("b", [3])
    pool.release("a")
    assert not pool.has("a") and pool.num_active == 1
    assert mappings() == 1 + 1  # the physical view and b's page
    assert pool.map_pages("c", [4]) == s  # the freed slot is taken again
    pool.release("b"), pool.release("c")
    pool.release("never-mapped")  # harmless
    assert mappings() == 1
    pool.check_invariants()


def test_released_range_is_no_longer_readable():
    """After release the range is PROT_NONE again: a read faults (in a child process)."""
    code = textwrap.dedent(
        f"""
        import torch
        from xllm.kv.xtensor import XTensorPool
        p = XTensorPool(num_pages=4, page_bytes={PAGE}, range_pages=2, dtype=torch.float32, num_slots=1)
        r = p.ranges()
        p.map_pages("a", [2])
        print(float(r[0]), flush=True)
        p.release("a")
        print(float(r[0]), flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["0.0"]
    assert proc.returncode == -11  # SIGSEGV


def test_out_of_slots_and_out_of_range(pool):
    for i in range(pool.num_slots):
        pool.map_pages(f"s{i}", [i])
    with pytest.raises(RuntimeError, match="ranges are in use"):
        pool.map_pages("one-more", [0])
    with pytest.raises(ValueError, match="exceed the range"):
        pool.map_pages("s0", list(range(pool.range_pages + 1)))
    with pytest.raises(ValueError, match="page id"):
        pool.map_pages("s0", [pool.num_pages])


def test_page_size_must_hold_whole_tokens_in_os_pages():
    assert check_page_size(16, 46080) == 16 * 46080  # SmolLM2 float32: 720 KiB pages
    with pytest.raises(ValueError, match="multiple of 4"):
        check_page_size(2, 46080)


def test_random_workload_keeps_mappings_consistent_and_leaks_none():
    """Thousands of grow / share / release operations over scattered pages: after each one the
    kernel's mapping count equals the runs of consecutive pages the pool holds mapped, it stays far
    inside vm.max_map_count, and everything is unmapped at the end."""
    gc.collect()
    START[0] = pool_mappings()
    rng = random.Random(0)
    p = XTensorPool(num_pages=512, page_bytes=PAGE, range_pages=64, dtype=torch.float32, num_slots=48)
    phys = p.physical().view(p.num_pages, FLOATS)
    ranges = p.ranges().view(p.num_slots, p.range_pages, FLOATS)
    for i in range(p.num_pages):
        phys[i, 0] = i
    live: dict[str, list[int]] = {}
    peak = 0
    for step in range(3000):
        op = rng.random()
        if live and op < 0.2:
            p.release(rng.choice(sorted(live)))
            live = {k: v for k, v in live.items() if p.has(k)}
        elif live and op < 0.7:  # grow a sequence by a scattered or a following page
            k = rng.choice(sorted(live))
            if len(live[k]) < p.range_pages:
                nxt = live[k][-1] + 1 if rng.random() < 0.5 and live[k][-1] + 1 < p.num_pages else rng.randrange(p.num_pages)
                live[k].append(nxt)
                p.map_pages(k, live[k])
        elif len(live) < p.num_slots:  # a new sequence, maybe sharing another's prefix
            k = f"seq-{step}"
            prefix = []
            if live and rng.random() < 0.5:
                other = live[rng.choice(sorted(live))]
                prefix = other[: rng.randint(0, len(other))]
            live[k] = prefix + [rng.randrange(p.num_pages)]
            p.map_pages(k, live[k])
        runs = sum(1 + sum(b != a + 1 for a, b in zip(v, v[1:])) for v in live.values())
        if step % 50 == 0 or step > 2950:
            assert mappings() <= 1 + runs  # adjacent ranges' mappings may merge, never more
            for k, v in live.items():
                assert ranges[p.slot(k), : len(v), 0].tolist() == v
        peak = max(peak, runs)
        p.check_invariants()
    assert peak < max_map_count() // 8
    for k in list(live):
        p.release(k)
    assert mappings() == 1
    del phys, ranges
    p = None
    gc.collect()
    assert mappings() == 0  # the last tensor over the pool took its mappings with it


def test_two_mib_pages_ask_for_huge_pages():
    """A page that is a multiple of 2 MiB asks for huge pages; `huge_pages` says whether the system
    grants them (hugetlb pages reserved, or shared-memory THP allowed), and when it does, the
    touched pool is huge-page backed in both views. On a system that grants none, it says so."""
    from xllm.kv import xtensor

    gc.collect()
    p = XTensorPool(num_pages=4, page_bytes=2 << 20, range_pages=2, dtype=torch.float32, num_slots=2)
    assert p._base % (2 << 20) == 0  # ranges start 2 MiB-aligned
    grantable = xtensor._shmem_thp() or xtensor._hugetlb_free_pages() >= 4
    assert p.huge_pages == grantable
    small = XTensorPool(num_pages=4, page_bytes=PAGE, range_pages=2, dtype=torch.float32, num_slots=1)
    assert not small.huge_pages
    if not grantable:
        pytest.skip("this system grants no huge pages to shared memory (shmem_enabled never, no hugetlb pages)")
    p.physical().fill_(1.0)
    before = xtensor.pool_huge_kib()
    assert before >= 4 * 2048  # the physical view
    p.map_pages("a", [1, 2])
    ranges = p.ranges()
    assert float(ranges[0]) == 1.0 and float(ranges[(2 << 20) // 4]) == 1.0
    assert xtensor.pool_huge_kib() >= before + 2 * 2048  # and the range
