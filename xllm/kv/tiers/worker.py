"""The worker side of the host/disk tiers: the host pool's memory, the copies, the disk I/O.

It holds the host pool, `[slots, layers, 2, block_size, Hkv, D]` (the platform's host memory,
page-locked on CUDA), and the
device cache's per-layer tensors; it carries out a step's transfers in order (`execute`), hands
disk writes and reads to `DiskStore`'s threads, and reports finished reads and lost writes
(`take_output`). It decides nothing: which hash goes where is the scheduler side's.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import torch

from xllm.kv.connector import KVConnectorMeta, KVConnectorOutput
from xllm.kv.tiers.disk import DiskStore


class TierWorker:
    def __init__(self, kv_caches: list[torch.Tensor], num_slots: int, disk: DiskStore | None = None,
                 host_buffer: Callable[[tuple, torch.dtype], torch.Tensor] | None = None):
        self.kv_caches = kv_caches
        _, _, bs, hkv, d = kv_caches[0].shape
        self.block_shape = (len(kv_caches), 2, bs, hkv, d)
        self.dtype = kv_caches[0].dtype
        shape = (num_slots, *self.block_shape)
        # the platform's host memory (page-locked on CUDA)
        self.host = host_buffer(shape, self.dtype) if host_buffer is not None else torch.empty(shape, dtype=self.dtype)
        self.disk = disk
        self._finished: queue.SimpleQueue[tuple[bytes, int, bool]] = queue.SimpleQueue()
        self.reads_in_flight = 0  # written by this thread only (started here, counted down in take_output)

    def _slot_bytes(self, slot: int) -> torch.Tensor:
        return self.host[slot].view(-1).view(torch.uint8)

    def execute(self, meta: KVConnectorMeta) -> None:
        for t in meta.transfers:
            if t.kind == "save":  # device block -> host slot, before a new owner writes the block
                for layer, cache in enumerate(self.kv_caches):
                    self.host[t.slot, layer].copy_(cache[:, t.block])
            elif t.kind == "load":  # host slot -> device block, before the step reads it
                for layer, cache in enumerate(self.kv_caches):
                    cache[:, t.block].copy_(self.host[t.slot, layer])
            elif t.kind == "spill":  # host slot -> disk; the bytes are copied now, written later
                self.disk.write(t.block_hash, self._slot_bytes(t.slot).numpy().tobytes())
            elif t.kind == "read":
                self._start_read(t.block_hash, t.slot)
            elif t.kind == "delete":
                self.disk.delete(t.block_hash)
            else:
                raise ValueError(f"unknown KV transfer {t.kind!r}")
        if meta.wait_for_reads and self.reads_in_flight:
            self._wait_for_reads()

    def _start_read(self, block_hash: bytes, slot: int) -> None:
        self.reads_in_flight += 1
        target = self._slot_bytes(slot)

        def into(payload: bytes) -> None:
            target.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))

        self.disk.read(block_hash, into, lambda ok: self._finished.put((block_hash, slot, ok)))

    def _wait_for_reads(self, timeout: float = 0.25) -> None:
        """Nothing else can run: sleep until the reads in flight have finished (bounded, so aborts
        are still seen), so that their request is admitted in one round, not one per read."""
        deadline = time.monotonic() + timeout
        finished = []
        while len(finished) < self.reads_in_flight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                finished.append(self._finished.get(timeout=remaining))
            except queue.Empty:
                break
        for item in finished:
            self._finished.put(item)  # reported by the next `take_output`

    def take_output(self) -> KVConnectorOutput:
        out = KVConnectorOutput()
        while True:
            try:
                out.finished_reads.append(self._finished.get_nowait())
            except queue.Empty:
                break
        self.reads_in_flight -= len(out.finished_reads)
        if self.disk is not None:
            out.lost = self.disk.take_lost()
        return out

    def flush(self) -> None:
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
