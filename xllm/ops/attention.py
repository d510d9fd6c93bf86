"""Paged attention, torch reference (the CPU path).

KV cache of one layer: `kv_cache` [2, num_blocks, block_size, Hkv, D] (K then V). A token at
absolute position p of a sequence lives in block `block_table[p // block_size]`, offset
`p % block_size`; its flat slot is `block * block_size + offset`.

One step's batch mixes sequences that bring several new tokens (prefill chunks) and sequences that
bring one (decodes). New tokens are laid out back to back: `q` is [T, H*D].
  - prefill chunks run one by one: the chunk's queries attend every earlier token of the sequence
    (read from the cache) and causally among themselves;
  - decodes run as one batched attention over their gathered block tables, padding masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xllm.ops import cpu_kernels


@dataclass
class PrefillSeq:
    q_start: int  # first row of this sequence's tokens in the step's [T, ...] layout
    q_len: int
    context_len: int  # tokens already in the cache before this step
    block_ids: torch.Tensor  # [num_blocks_for(context_len + q_len)] long
    mask: torch.Tensor | None  # [q_len, context_len + q_len] bool (True = attend); None if context_len == 0
    slot: int | None = None  # xtensor layout: the sequence's range

    def to(self, device: torch.device) -> "PrefillSeq":
        mask = None if self.mask is None else self.mask.to(device)
        return PrefillSeq(self.q_start, self.q_len, self.context_len, self.block_ids.to(device), mask, self.slot)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot for each new token
    prefills: list[PrefillSeq]
    decode_rows: torch.Tensor  # [Bd] long: row of each decode token in [T, ...]
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] long (padded with block 0)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, max_blocks * block_size] float additive (0 / -inf)
    block_size: int
    decode_seq_lens: torch.Tensor | None = None  # [Bd] long: tokens in cache incl. the new one
    decode_slots: torch.Tensor | None = None  # [Bd] long: xtensor layout, each decode's range (no table, no mask)

    def to(self, device: torch.device) -> "AttentionMetadata":
        """The same metadata with its tensors on `device` (itself when they are there already)."""
        if self.slot_mapping.device == device:
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return AttentionMetadata(
            move(self.slot_mapping), [p.to(device) for p in self.prefills], move(self.decode_rows),
            move(self.decode_block_tables), move(self.decode_mask), self.block_size, move(self.decode_seq_lens),
            move(self.decode_slots),
        )


def build_prefill(q_start: int, q_len: int, context_len: int, block_ids: torch.Tensor, slot: int | None = None) -> PrefillSeq:
    mask = None
    if context_len > 0:
        q_pos = torch.arange(context_len, context_len + q_len).unsqueeze(1)
        k_pos = torch.arange(context_len + q_len).unsqueeze(0)
        mask = k_pos <= q_pos
    return PrefillSeq(q_start, q_len, context_len, block_ids, mask, slot)


def build_decode_mask(seq_lens: torch.Tensor, max_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """seq_lens: [Bd] tokens in cache including the new one -> additive mask [Bd, 1, 1, max_blocks*block_size]."""
    k_pos = torch.arange(max_blocks * block_size, device=seq_lens.device).unsqueeze(0)
    mask = torch.zeros(seq_lens.shape[0], max_blocks * block_size, dtype=dtype, device=seq_lens.device)
    mask.masked_fill_(k_pos >= seq_lens.unsqueeze(1), float("-inf"))
    return mask.view(seq_lens.shape[0], 1, 1, -1)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> their slots in the cache."""
    if cpu_kernels.write_kv(kv_cache, k, v, slot_mapping):
        return
    _, num_blocks, block_size, hkv, d = kv_cache.shape
    if kv_cache.is_contiguous():
        kv_cache[0].view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, v)
    else:  # the xtensor pool's view of one layer: blocks are pages apart
        index = (slot_mapping // block_size, slot_mapping % block_size)
        kv_cache[0].index_put_(index, k)
        kv_cache[1].index_put_(index, v)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D] (new tokens)
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write the new K/V into the cache, then attend; returns [T, H, D]. With the xtensor layout,
    `ranges` are the layer's K and V range views [slots, pages, block_size, Hkv, D] (kv/xtensor.py)
    and every sequence's earlier tokens are read from its own range, in place."""
    write_kv(kv_cache, k, v, md.slot_mapping)
    if md.decode_slots is not None:
        return _range_attention(q, k, v, ranges, md, scale)
    out = torch.empty_like(q)
    _, _, _, hkv, d = kv_cache.shape

    def gathered(seq: PrefillSeq, kv_len: int):  # the chunk's blocks, gathered
        return tuple(kv_cache[i].index_select(0, seq.block_ids).view(-1, hkv, d)[:kv_len] for i in (0, 1))

    _attend_prefills(q, k, v, md, scale, out, gathered)
    if md.decode_rows.numel():
        decoded = None  # from the compiled kernel, when it takes this cache
        if md.decode_seq_lens is not None:
            only_decodes = not md.prefills  # then row i of q is decode i: no gather, no scatter
            decoded = cpu_kernels.paged_decode_attention(
                q if only_decodes else q[md.decode_rows], kv_cache, md.decode_block_tables, md.decode_seq_lens, scale
            )
            if decoded is not None and only_decodes:
                return decoded
        if decoded is not None:
            out[md.decode_rows] = decoded
            return out
        # One query per sequence: the G = H / Hkv query heads sharing a KV head are stacked as G query
        # rows against that head's keys, so GQA needs no copy of K/V per query head.
        bd, h = md.decode_rows.shape[0], q.shape[1]
        qd = q[md.decode_rows].view(bd, hkv, h // hkv, d)  # head kvh * G + j -> [kvh, j]
        # Gather blocks: [Bd * max_blocks, block_size, Hkv, D] -> [Bd, Hkv, max_blocks*block_size, D].
        # index_select on the block dimension is several times faster than advanced indexing here.
        table = md.decode_block_tables.flatten()
        kd = kv_cache[0].index_select(0, table).view(bd, -1, hkv, d).transpose(1, 2)
        vd = kv_cache[1].index_select(0, table).view(bd, -1, hkv, d).transpose(1, 2)
        if md.decode_mask is None:  # built on first use, by the first layer that takes this path
            md.decode_mask = build_decode_mask(md.decode_seq_lens, md.decode_block_tables.shape[1], md.block_size, torch.float32)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=md.decode_mask.to(q.dtype), scale=scale)
        out[md.decode_rows] = o.reshape(bd, h, d)
    return out


def _sdpa(q: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, seq: PrefillSeq | None, scale: float) -> torch.Tensor:
    """One sequence: q [q_len, H, D] against ks/vs [kv_len, Hkv, D] -> [q_len, H, D]; causal within a
    prefill chunk `seq`, and a single decode query (`seq` None) attends every key."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
        attn_mask=None if seq is None else seq.mask, is_causal=seq is not None and seq.mask is None, scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(0).transpose(0, 1)


def _attend_prefills(q, k, v, md: AttentionMetadata, scale: float, out: torch.Tensor, context) -> None:
    """Each prefill chunk with SDPA into `out`: a fresh prompt against its own new K/V, a chunk over
    cached context against `context(seq, kv_len)` -> (K, V) [kv_len, Hkv, D] read from the cache."""
    for seq in md.prefills:
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        ks, vs = (k[rows], v[rows]) if seq.context_len == 0 else context(seq, seq.context_len + seq.q_len)
        out[rows] = _sdpa(q[rows], ks, vs, seq, scale)


def _range_rows(ranges: torch.Tensor, slot: int, length: int) -> torch.Tensor:
    """The first `length` token rows of a range as [length, Hkv, D] (one strided copy of mapped pages only)."""
    pages = -(-length // ranges.shape[2])
    return ranges[slot, :pages].reshape(-1, ranges.shape[3], ranges.shape[4])[:length]


def _range_attention(q, k, v, ranges, md: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention over xtensor ranges [slots, pages, block_size, Hkv, D]: sequence i's keys are the
    first `len` rows of `k_ranges[slot]`, its own pages in order (no table)."""
    k_ranges, v_ranges = ranges
    only_decodes = not md.prefills
    out = None if only_decodes else torch.empty_like(q)
    _attend_prefills(
        q, k, v, md, scale, out, lambda seq, n: (_range_rows(k_ranges, seq.slot, n), _range_rows(v_ranges, seq.slot, n))
    )
    if not md.decode_rows.numel():
        return out
    qd = q if only_decodes else q[md.decode_rows]
    decoded = cpu_kernels.range_decode_attention(qd, k_ranges, v_ranges, md.decode_slots, md.decode_seq_lens, scale)
    if decoded is None:  # torch: one SDPA per sequence over its range (no padding, no gather)
        decoded = torch.empty_like(qd)
        for i, (slot, length) in enumerate(zip(md.decode_slots.tolist(), md.decode_seq_lens.tolist())):
            ks, vs = _range_rows(k_ranges, slot, length), _range_rows(v_ranges, slot, length)
            decoded[i] = _sdpa(qd[i : i + 1], ks, vs, None, scale)[0]
    if only_decodes:
        return decoded
    out[md.decode_rows] = decoded
    return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention of one whole sequence: q [L, H, D], k/v [L, Hkv, D] -> [L, H, D]. For tests."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    L = q.shape[0]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)
