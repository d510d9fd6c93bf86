import pytest

from xllm.kv.block_pool import BlockPool
from xllm.kv.manager import KVCacheManager


def test_allocate_and_free_round_trip():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    assert all(pool.ref_counts[b] == 1 for b in a)
    pool.free(a)
    assert pool.num_free == 4 and pool.usage() == 0.0


def test_allocate_more_than_free_raises():
    pool = BlockPool(2)
    pool.allocate(2)
    with pytest.raises(MemoryError):
        pool.allocate(1)


def test_shared_block_is_freed_only_by_last_holder():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.incref([b])
    pool.free([b])
    assert pool.num_free == 1 and pool.ref_counts[b] == 1
    pool.free([b])
    assert pool.num_free == 2


def test_double_free_and_sharing_a_free_block_are_errors():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError):
        pool.free([b])
    with pytest.raises(ValueError):
        pool.incref([b])


def test_manager_grows_allocation_by_blocks():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.allocate_slots("a", 1)
    assert len(kv.block_ids("a")) == 1
    assert kv.allocate_slots("a", 4)
    assert len(kv.block_ids("a")) == 1
    assert kv.allocate_slots("a", 9)
    assert len(kv.block_ids("a")) == 3
    assert not kv.allocate_slots("b", 13)  # needs 4, only 2 free
    assert kv.block_ids("b") == [] and kv.num_free_blocks == 2  # a refused request takes nothing
    kv.free("a")
    assert kv.num_free_blocks == 5
    assert kv.can_ever_fit(20) and not kv.can_ever_fit(21)
