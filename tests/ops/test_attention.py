import math
import random

import pytest
import torch

from xllm.kv.xtensor import XTensorPool, os_page_size
from xllm.ops import cpu_kernels
from xllm.ops.attention import (
    AttentionMetadata,
    build_decode_mask,
    build_prefill,
    paged_attention,
    reference_attention,
    write_kv,
)


@pytest.fixture(params=[False, True], ids=["torch", "kernels"])
def kernels(request, monkeypatch):
    """Run each case on the torch reference and on the compiled decode kernel."""
    if request.param:
        assert cpu_kernels.load() is not None  # built by the session fixture
    monkeypatch.setattr(cpu_kernels, "_enabled", request.param)
    return request.param


def xtensor_cache(num_blocks: int, block_size: int, kv_heads: int, d: int, dtype, max_len: int, num_seqs: int):
    """A real xtensor pool for one layer's cache: as many layers per token as make a page a multiple of
    the OS page, the last one used (so its offset inside the token is exercised). Returns (pool, the
    layer's physical view [2, num_blocks, block_size, Hkv, D], its K and V range views)."""
    layer_bytes = 2 * kv_heads * d * torch.empty(0, dtype=dtype).element_size()
    layers = os_page_size() // math.gcd(block_size * layer_bytes, os_page_size())
    range_pages = -(-max_len // block_size)
    pool = XTensorPool(num_blocks, block_size * layers * layer_bytes, range_pages, dtype, num_slots=num_seqs)
    phys = pool.physical().view(num_blocks, layers, 2, block_size, kv_heads, d)[:, -1].transpose(0, 1)
    ranges = pool.ranges().view(num_seqs, range_pages, layers, 2, block_size, kv_heads, d)[:, :, -1]
    return pool, phys, (ranges[:, :, 0], ranges[:, :, 1])


def run_case(
    seed: int, heads: int, kv_heads: int, block_size: int, dtype=torch.float32, d: int = 16, only_decodes=False, layout="paged"
):
    """A mixed batch: fresh prefills, chunked prefills over cached context, and decodes; in the
    paged layout or the xtensor one (each sequence's blocks mapped into its own range)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 256
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []  # (total_len, new_len)
    for _ in range(rng.randint(1, 6)):
        kind = "decode" if only_decodes else rng.choice(["fresh", "chunk", "decode"])
        total = rng.randint(2, 300) if only_decodes else rng.randint(2, 40)
        new = {"fresh": total, "chunk": rng.randint(2, total), "decode": 1}[kind]
        if kind == "chunk" and new == total:
            new = total - 1 if total > 2 else total
        seqs.append((total, new))
    pool = ranges = None
    if layout == "xtensor":
        pool, cache, ranges = xtensor_cache(num_blocks, block_size, kv_heads, d, dtype, max(t for t, _ in seqs), len(seqs))
    else:
        cache = torch.zeros(2, num_blocks, block_size, kv_heads, d, dtype=dtype)
    full_q, full_k, full_v, tables = [], [], [], []
    for total, new in seqs:
        full_q.append(torch.randn(total, heads, d, dtype=dtype))
        full_k.append(torch.randn(total, kv_heads, d, dtype=dtype))
        full_v.append(torch.randn(total, kv_heads, d, dtype=dtype))
        n_blocks = -(-total // block_size)
        tables.append([free.pop() for _ in range(n_blocks)])
    # Earlier context goes into the cache directly.
    for (total, new), k, v, table in zip(seqs, full_k, full_v, tables):
        for p in range(total - new):
            cache[0, table[p // block_size], p % block_size] = k[p]
            cache[1, table[p // block_size], p % block_size] = v[p]
    q_rows, k_rows, v_rows, slots, prefills = [], [], [], [], []
    decode_rows, decode_lens, decode_tables, decode_slots = [], [], [], []
    row = 0
    for i, ((total, new), q, k, v, table) in enumerate(zip(seqs, full_q, full_k, full_v, tables)):
        start = total - new
        q_rows.append(q[start:]), k_rows.append(k[start:]), v_rows.append(v[start:])
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, total)]
        slot = pool.map_pages(f"seq-{i}", table) if pool is not None else None
        if new == 1:
            decode_rows.append(row), decode_lens.append(total), decode_tables.append(table), decode_slots.append(slot)
        else:
            prefills.append(build_prefill(row, new, start, torch.tensor(table), slot))
        row += new
    width = max([len(t) for t in decode_tables], default=1)
    table_t = torch.zeros(len(decode_tables), width, dtype=torch.long)
    for i, t in enumerate(decode_tables):
        table_t[i, : len(t)] = torch.tensor(t)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        prefills=prefills,
        decode_rows=torch.tensor(decode_rows, dtype=torch.long),
        decode_block_tables=table_t,
        decode_mask=build_decode_mask(torch.tensor(decode_lens), width, block_size, torch.float32) if decode_rows else None,
        block_size=block_size,
        decode_seq_lens=torch.tensor(decode_lens, dtype=torch.long),
        decode_slots=torch.tensor(decode_slots, dtype=torch.long) if pool is not None else None,
    )
    scale = d**-0.5
    out = paged_attention(torch.cat(q_rows), torch.cat(k_rows), torch.cat(v_rows), cache, md, scale, ranges)
    row = 0
    for (total, new), q, k, v in zip(seqs, full_q, full_k, full_v):
        expected = reference_attention(q, k, v, scale)[total - new :]
        torch.testing.assert_close(out[row : row + new], expected, atol=2e-5 if dtype == torch.float32 else 2e-2, rtol=1e-3)
        row += new


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_dense_reference(seed, heads, kv_heads, block_size, kernels):
    run_case(seed, heads, kv_heads, block_size)


@pytest.mark.parametrize("seed", range(4))
def test_paged_attention_bfloat16(seed, kernels):
    run_case(seed, 6, 2, 8, dtype=torch.bfloat16)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (8, 8, 32), (16, 2, 12), (4, 1, 128), (14, 2, 64), (12, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_only_batches(seed, heads, kv_heads, d, dtype, kernels):
    """Decode-only steps (the kernel's fast path: no gather or scatter of rows), longer contexts,
    head sizes that are and are not multiples of the vector width."""
    run_case(seed, heads, kv_heads, 16, dtype=dtype, d=d, only_decodes=True)


def test_decode_kernel_rejects_bad_tables():
    assert cpu_kernels.load() is not None
    cache = torch.zeros(2, 4, 16, 1, 8)
    q = torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="block id"):
        cpu_kernels.paged_decode_attention(q, cache, torch.tensor([[7]]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="seq_len"):
        cpu_kernels.paged_decode_attention(q, cache, torch.tensor([[0]]), torch.tensor([17]), 1.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_xtensor_ranges_match_dense_reference(seed, heads, kv_heads, block_size, kernels):
    """The same mixed batches read from per-sequence ranges of a real page pool: prefill chunks read
    their context from the range, decodes run the range kernel (or one SDPA per sequence)."""
    run_case(seed, heads, kv_heads, block_size, layout="xtensor")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (16, 2, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xtensor_decode_only_batches(seed, heads, kv_heads, d, dtype, kernels):
    run_case(seed, heads, kv_heads, 16, dtype=dtype, d=d, only_decodes=True, layout="xtensor")


def test_range_kernel_rejects_bad_slots():
    assert cpu_kernels.load() is not None
    ranges = torch.zeros(2, 2, 16, 1, 8)
    q = torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="slot"):
        cpu_kernels.range_decode_attention(q, ranges, ranges, torch.tensor([2]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="seq_len"):
        cpu_kernels.range_decode_attention(q, ranges, ranges, torch.tensor([0]), torch.tensor([33]), 1.0)


@pytest.mark.parametrize("layout", ["paged", "xtensor-view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_kernel_matches_torch(layout, dtype):
    """The kernel writes strided K/V rows (views of a fused projection) into a contiguous paged
    cache or a view whose blocks are pages apart, exactly where the torch path does."""
    assert cpu_kernels.load() is not None
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, d, t = 12, 4, 3, 16, 9
    if layout == "paged":
        make = lambda: torch.zeros(2, nb, bs, hkv, d, dtype=dtype)  # noqa: E731
    else:  # [blocks, layers=2, 2, bs, hkv, d] storage, one layer's [2, nb, bs, hkv, d] view (strided)
        make = lambda: torch.zeros(nb, 2, 2, bs, hkv, d, dtype=dtype)[:, 1].transpose(0, 1)  # noqa: E731
    fused = torch.randn(t, (9 + 2 * hkv) * d, generator=g).to(dtype)
    k = fused[:, 9 * d : (9 + hkv) * d].view(t, hkv, d)
    v = fused[:, (9 + hkv) * d :].view(t, hkv, d)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    ref, out = make(), make()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "_enabled", False)
        write_kv(ref, k, v, slots)
    assert cpu_kernels.write_kv(out, k, v, slots)
    assert torch.equal(out, ref) and out.abs().sum() > 0
