"""The routing policies and the global KV index: pure parts, tested exhaustively on small cases."""

import itertools
import subprocess
import sys

import pytest

from xllm.kv.block_hash import extend_hashes
from xllm.router.kv_index import KVIndex
from xllm.router.policies import NoInstanceError, get_policy
from xllm.router.policies.base import InstanceState as I
from xllm.router.policies.base import RouteRequest
from xllm.router.policies.prefix_aware import PrefixAware


def chain(tokens, block_size=16):
    hashes = []
    extend_hashes(hashes, tokens, block_size, len(tokens) // block_size, None)
    return tuple(hashes)


PROMPT = list(range(1, 161))  # 10 blocks of 16
REQ = RouteRequest(len(PROMPT), chain(PROMPT))


def test_the_router_parts_import_no_torch():
    code = ("import sys, xllm.router.kv_index, xllm.router.policies as p\n"
            "[p.get_policy(n) for n in p.POLICY_NAMES]\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["round-robin", "least-load", "kv-aware", "prefix-aware"])
def test_no_healthy_instance_is_an_error(name):
    policy = get_policy(name)
    for instances in ([], [I("a", healthy=False)]):
        with pytest.raises(NoInstanceError):
            policy.select(REQ, instances, KVIndex())
    with pytest.raises(ValueError, match="unknown routing policy"):
        get_policy("random")


def test_round_robin_cycles_in_name_order_and_skips_the_unhealthy():
    rr = get_policy("round-robin")
    pool = [I("b"), I("a"), I("c", healthy=False)]
    assert [rr.select(REQ, pool).instance for _ in range(4)] == ["a", "b", "a", "b"]


def test_least_load_orders_by_waiting_then_running_then_kv():
    ll = get_policy("least-load")
    assert ll.select(REQ, [I("a", waiting=2), I("b", waiting=1, running=9)]).instance == "b"
    assert ll.select(REQ, [I("a", running=3), I("b", running=2)]).instance == "b"
    assert ll.select(REQ, [I("a", num_blocks=10, free_blocks=2), I("b", num_blocks=10, free_blocks=5)]).instance == "b"
    assert ll.select(REQ, [I("b"), I("a")]).instance == "a"  # ties: by name
    # every order of the same pool gives the same answer
    pool = [I("a", waiting=1), I("b", running=1), I("c", waiting=1, running=1)]
    assert {ll.select(REQ, list(p)).instance for p in itertools.permutations(pool)} == {"b"}


def test_kv_aware_takes_room_first_then_the_shortest_queue():
    kv = get_policy("kv-aware")
    small, big = I("small", num_blocks=100, free_blocks=5), I("big", num_blocks=100, free_blocks=50, waiting=1)
    assert kv.select(REQ, [small, big]).instance == "big"  # 5 blocks cannot take 160 tokens
    assert kv.select(REQ, [I("x", num_blocks=100, free_blocks=40, waiting=0), big]).instance == "x"
    full = [I("p", free_blocks=0, waiting=3), I("q", free_blocks=0, waiting=1)]
    assert kv.select(REQ, full).instance == "q"


def test_the_index_applies_batches_in_order_and_resyncs_from_a_snapshot():
    index = KVIndex()
    h = REQ.block_hashes
    assert index.apply("a", 0, [("stored", "device", h[:4])])
    assert index.matched("a", h) == {"device": 4, "host": 0, "disk": 0}
    assert index.apply("a", 1, [("stored", "host", h[4:6]), ("removed", "device", h[3:4]), ("stored", "host", h[3:4])])
    assert index.matched("a", h) == {"device": 3, "host": 3, "disk": 0}
    assert not index.apply("a", 3, [("stored", "disk", h[6:])])  # batch 2 was missed
    assert index.needs_snapshot("a") and index.matched("a", h) == {"device": 0, "host": 0, "disk": 0}
    assert not index.apply("a", 4, [])  # still stale until the snapshot
    index.snapshot("a", 4, {"device": h[:2], "disk": h[2:5]})
    assert index.matched("a", h) == {"device": 2, "host": 0, "disk": 3} and index.apply("a", 5, [])
    # the chain stops at the first block no tier holds
    index.snapshot("b", 0, {"device": h[:2] + h[3:]})
    assert index.matched("b", h)["device"] == 2
    index.remove("a")
    assert index.instances() == ["b"] and index.needs_snapshot("a")
    with pytest.raises(ValueError):
        index.apply("b", 1, [("stored", "gpu", h[:1])])


def test_prefix_aware_follows_the_cache_when_loads_are_even():
    index = KVIndex()
    index.snapshot("a", 0, {"device": REQ.block_hashes[:8]})
    pool = [I("a", num_blocks=100, free_blocks=90), I("b", num_blocks=100, free_blocks=90)]
    choice = get_policy("prefix-aware").select(REQ, pool, index)
    assert choice.instance == "a" and choice.matched_blocks == 8
    # with nothing cached anywhere: the least active KV
    pool = [I("a", num_blocks=100, free_blocks=60), I("b", num_blocks=100, free_blocks=90)]
    assert get_policy("prefix-aware").select(REQ, pool, KVIndex()).instance == "b"


def test_prefix_aware_weighs_tiers_device_over_host_over_disk():
    index = KVIndex()
    h = REQ.block_hashes
    index.snapshot("dev", 0, {"device": h})
    index.snapshot("host", 0, {"host": h})
    index.snapshot("disk", 0, {"disk": h})
    pool = [I(n, num_blocks=100, free_blocks=90) for n in ("disk", "host", "dev")]
    p = get_policy("prefix-aware")
    assert p.select(REQ, pool, index).instance == "dev"
    assert p.select(REQ, pool[:2], index).instance == "host"
    costs = {i.name: p.cost(REQ, i, index.matched(i.name, h)) for i in pool}
    assert costs == {"dev": 10.0, "host": 10 + 10 * 0.1, "disk": 10 + 10 * 0.5}


def test_prefix_aware_trades_the_cache_against_load_by_its_rule():
    index = KVIndex()
    index.snapshot("cached", 0, {"device": REQ.block_hashes})  # all 10 blocks
    p = PrefixAware()
    # cost(cached) = 0 + active + 10 * waiting; cost(idle) = 10 + 0
    assert p.select(REQ, [I("cached", num_blocks=100, free_blocks=91), I("idle", num_blocks=100, free_blocks=100)],
                    index).instance == "cached"  # 9 active < 10 to prefill
    assert p.select(REQ, [I("cached", num_blocks=100, free_blocks=89), I("idle", num_blocks=100, free_blocks=100)],
                    index).instance == "idle"  # 11 active > 10
    assert p.select(REQ, [I("cached", num_blocks=100, free_blocks=100, waiting=1),
                          I("idle", num_blocks=100, free_blocks=100)], index).instance == "cached"  # 10 = 10: by name
    assert p.select(REQ, [I("cached", num_blocks=100, free_blocks=100, waiting=2),
                          I("idle", num_blocks=100, free_blocks=100)], index).instance == "idle"  # 2 queued prompts
    # without room for the blocks it must add, an instance is a last resort
    assert p.select(REQ, [I("cached", num_blocks=100, free_blocks=100), I("tight", num_blocks=100, free_blocks=3)],
                    KVIndex()).instance == "cached"
    assert p.select(REQ, [I("x", free_blocks=3), I("y", free_blocks=2)], KVIndex()).reason.endswith("(none has room)")


def test_prefix_aware_balance_guard():
    index = KVIndex()
    index.snapshot("cached", 0, {"device": REQ.block_hashes})
    p = PrefixAware(prefill_weight=100.0)  # the cache would win by far on cost
    pool = [I("cached", num_blocks=100, free_blocks=100, waiting=40), I("idle", num_blocks=100, free_blocks=100, waiting=2)]
    choice = p.select(REQ, pool, index)
    assert choice.instance == "idle" and choice.reason.startswith("imbalanced")
    # within the thresholds the cost decides
    pool = [I("cached", num_blocks=100, free_blocks=100, waiting=30), I("idle", num_blocks=100, free_blocks=100, waiting=2)]
    assert p.select(REQ, pool, index).instance == "cached"
